"""Attention over only the used prefix of a cache (``kv_used``): the same output as attending over every slot."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dspark_jax import kernels
from dspark_jax.cache import causal_cache_mask
from dspark_jax.kernels.attention import prefix_sizes


def test_prefix_sizes_cover_the_capacity_in_at_most_eight_steps():
    assert prefix_sizes(20) == [20]
    assert prefix_sizes(100) == [32, 64, 96, 100]
    assert prefix_sizes(384) == [48, 96, 144, 192, 240, 288, 336, 384]
    for c in (1, 31, 32, 33, 157, 357, 1000, 4096):
        sizes = prefix_sizes(c)
        assert sizes[-1] == c and sizes == sorted(set(sizes)) and len(sizes) <= 9


@pytest.mark.parametrize("starts", [(0, 0), (31, 5), (32, 2), (70, 95), (97, 96), (99, 40)])
def test_used_prefix_equals_the_full_cache(starts, rng):
    """A causal cache mask at ``start + S`` slots: a jitted call with a traced bound on the slots gives the full
    attention's output at every bound, including a branch's edge and the last (the whole capacity)."""
    b, s, nh, nkv, hd, c = 2, 3, 4, 2, 8, 100
    q = jnp.asarray(rng.normal(size=(b, s, nh, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, c, nkv, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, c, nkv, hd)), jnp.float32)
    start = jnp.asarray(starts, jnp.int32)
    mask = causal_cache_mask(start, s, c)
    want = kernels.attention_reference(q, k, v, mask, 0.3)
    used = jnp.minimum(jnp.max(start) + s, c)
    got = jax.jit(lambda q, k, v, m, u: kernels.attention(q, k, v, m, 0.3, impl="xla", kv_used=u))(q, k, v, mask,
                                                                                                   used)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_used_prefix_with_a_broadcast_mask_and_an_empty_row(rng):
    """``mask [1, S, T]`` broadcast over the batch, and a query that sees nothing (output 0, as without a bound)."""
    q = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 80, 1, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 80, 1, 4)), jnp.float32)
    mask = jnp.zeros((1, 2, 80), bool).at[0, 0, :40].set(True)
    want = kernels.attention_reference(q, k, v, mask, 0.5)
    got = kernels.attention(q, k, v, mask, 0.5, kv_used=jnp.int32(40))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    assert not np.asarray(got[:, 1]).any()
