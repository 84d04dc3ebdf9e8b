"""argmax_last: the CPU-friendly argmax the greedy decode paths use must agree with jnp.argmax exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decode.sampling import (
    SamplingConfig,
    argmax_last,
    categorical,
    sample_tokens,
    top_k_values,
    warp_logits,
)


@pytest.mark.parametrize("shape", [(5,), (3, 2048), (2, 7, 1000), (1, 151936)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_argmax_last_equals_jnp_argmax(shape, dtype):
    x = jax.random.normal(jax.random.key(sum(shape)), shape).astype(dtype)
    got = argmax_last(x)
    assert got.dtype == jnp.int32 and got.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))


def test_argmax_last_ties_and_infinities():
    x = jnp.asarray([[1.0, 3.0, 3.0, 0.0],            # tie: the first maximal index, like jnp.argmax
                     [-jnp.inf] * 4,                  # all -inf: index 0, like jnp.argmax
                     [-jnp.inf, 2.0, jnp.inf, jnp.inf],
                     [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(argmax_last(x)), np.asarray(jnp.argmax(x, axis=-1)))


def test_argmax_last_nan_row_stays_in_range():
    x = jnp.asarray([[0.0, jnp.nan, 1.0]])
    assert 0 <= int(argmax_last(x)[0]) < 3


def test_greedy_sample_tokens_uses_the_first_max():
    logits = jnp.asarray([[0.5, 2.0, 2.0], [9.0, -1.0, 9.0]])
    np.testing.assert_array_equal(np.asarray(sample_tokens(logits, jax.random.key(0), SamplingConfig())), [1, 0])


def _warp_by_full_sort(logits, cfg):
    """The filters as transformers applies them, the nucleus ranked by a sort of the whole vocabulary."""
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        x = jnp.where(x < jax.lax.top_k(x, cfg.top_k)[0][..., -1:], -jnp.inf, x)
    sorted_x = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < cutoff, -jnp.inf, x)


@pytest.mark.parametrize("cfg", [SamplingConfig(0.7, 20, 0.8), SamplingConfig(1.0, 5, 0.5),
                                 SamplingConfig(1.3, 50, 0.95), SamplingConfig(0.7, 3, 0.999)])
def test_top_k_then_top_p_equals_the_full_sort(cfg):
    x = jax.random.normal(jax.random.key(cfg.top_k), (64, 1000)) * 3
    # ties at the k-th value: both survive the top-k filter and share the normaliser
    x = x.at[0, :4].set(9.0).at[1, :30].set(2.0)
    got, want = warp_logits(x, cfg), _warp_by_full_sort(x, cfg)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), np.isfinite(np.asarray(want)))
    np.testing.assert_allclose(np.asarray(got)[np.isfinite(got)], np.asarray(want)[np.isfinite(want)], rtol=1e-6)


@pytest.mark.parametrize("v", [7, 2048])
def test_categorical_draws_what_jax_random_categorical_draws(v):
    logits = jax.random.normal(jax.random.key(v), (16, v)) * 2
    logits = logits.at[:, 0].set(-jnp.inf)
    for seed in range(8):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(categorical(key, logits)),
                                      np.asarray(jax.random.categorical(key, logits, axis=-1)))


@pytest.mark.parametrize("shape,k", [((16, 2048), 20), ((3, 7), 4), ((2, 5, 100), 7), ((2, 9), 9)])
def test_top_k_values_equals_lax_top_k(shape, k):
    """The CPU rounds (max, count, mask) give lax.top_k's values: ties repeated, -inf rows and tails included,
    inside a jitted loop as in the decode loops."""
    rng = np.random.default_rng(k)
    x = np.round(rng.standard_normal(shape), 1).astype(np.float32)     # rounding makes many ties
    flat = x.reshape(-1, shape[-1])
    flat[0, 2:] = -np.inf                                                # fewer finite values than k
    flat[-1, : min(k + 2, shape[-1])] = flat[-1].max()                   # the maximum tied beyond k
    x = jnp.asarray(x)
    want = jax.lax.top_k(x, k)[0]
    got = jax.jit(lambda v: jax.lax.fori_loop(0, 2, lambda i, c: top_k_values(x + 0 * c[..., :1], k), want))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
