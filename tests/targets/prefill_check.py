"""The prefill contract every target shares, checked the same way for each."""

import jax.numpy as jnp
import numpy as np


def assert_prefill_matches_empty_cache_forward(target, rng, lengths, capacity, taps, tol):
    """``target.prefill`` of right-padded rows (``lengths``, the longest = prompt width) gives the logits at each
    row's last token, the taps, the lengths and the cache (real slots) of a forward against an empty cache of the
    same capacity, and one decode step from either cache gives the same logits."""
    lengths = jnp.asarray(lengths, jnp.int32)
    b, s = len(lengths), int(lengths.max())
    ids = jnp.asarray(rng.integers(0, target.config.vocab_size, size=(b, s)))
    at = (lengths - 1)[:, None]
    ref = target(ids, target.init_cache(b, capacity), num_new=lengths, tap_layer_ids=taps, logits_at=at)
    got = target.prefill(ids, capacity, num_new=lengths, tap_layer_ids=taps, logits_at=at)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), atol=tol, rtol=0)
    np.testing.assert_allclose(np.asarray(got.taps), np.asarray(ref.taps), atol=tol, rtol=0)
    np.testing.assert_array_equal(np.asarray(got.cache.lengths), np.asarray(lengths))
    assert got.cache.capacity == capacity
    for a, r in zip(got.cache.keys + got.cache.values, ref.cache.keys + ref.cache.values):
        assert a.shape == r.shape
        for row, n in enumerate(np.asarray(lengths)):
            np.testing.assert_allclose(np.asarray(a[row, :n]), np.asarray(r[row, :n]), atol=tol, rtol=0)
    nxt = jnp.asarray(rng.integers(0, target.config.vocab_size, size=(b, 1)))
    np.testing.assert_allclose(np.asarray(target(nxt, got.cache).logits), np.asarray(target(nxt, ref.cache).logits),
                               atol=tol, rtol=0)
