"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases (profile name ``mlp``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.nn.linear import linear


class SwiGLU(nnx.Module):
    """``[..., H] -> [..., H]`` with hidden width ``intermediate``."""

    def __init__(self, hidden: int, intermediate: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        mk = lambda i, o, axes: linear(i, o, axes, dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
        self.gate_proj = mk(hidden, intermediate, ("embed", "mlp"))
        self.up_proj = mk(hidden, intermediate, ("embed", "mlp"))
        self.down_proj = mk(intermediate, hidden, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
