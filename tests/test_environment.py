"""Guards against a known-broken toolchain: jaxlib 0.10.2 miscompiles a broadcast-multiply-reduce on CPU
(jax-ml/jax#39103), which silently corrupts jitted results. pyproject excludes it; this test catches an
environment that installed it anyway."""

import jax
import jax.numpy as jnp
import numpy as np


def test_jit_broadcast_multiply_reduce_matches_numpy():
    a = np.asarray(jax.random.normal(jax.random.key(0), (1, 16, 16)), np.float64)
    b = np.asarray(jax.random.normal(jax.random.key(1), (256, 16, 16)), np.float64)
    ref = a * np.sum(a * b, -1, keepdims=True)
    got = jax.jit(lambda x, y: x * jnp.sum(x * y, -1, keepdims=True))(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-3, rtol=1e-4,
                               err_msg=f"jax {jax.__version__}: jit miscompiles broadcast-multiply-reduce")
