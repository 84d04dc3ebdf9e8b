"""Ragged verification: the target verifies a flattened batch of exactly the tokens the scheduler chose.

With per-row proposal lengths ``L [B]`` a round verifies ``sum(L + 1)`` tokens, but a padded ``[B, Bs+1]``
forward costs ``B * (Bs+1)`` whatever the schedule. Here the rows' tokens (anchor + first L drafts) are packed
left to right into a flat vector whose length is the smallest of a few static *buckets* that holds them;
only that bucket's forward runs (a chain of zero-or-one-trip loops, decode/control_flow.py, not a ``switch``, which
would copy the caches), so compute follows the schedule's budget while every shape stays static (one compiled
forward per bucket, chosen on device without a host round trip). Results are
scattered back to the padded ``[B, Bs+1, ...]`` layout the rest of the loop uses; positions past a row's
``L + 1`` hold zeros and are never read (verification only looks at positions ``<= L``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dspark_jax.cache import KVCache
from dspark_jax.decode.control_flow import switch_in_place


def ragged_buckets(batch: int, width: int, smallest: int | None = None) -> tuple[int, ...]:
    """Static flat capacities for ``batch`` rows of up to ``width`` tokens: powers of two from ``batch``
    (every row verifies at least its anchor) up to, and always including, ``batch * width``."""
    if batch < 1 or width < 1:
        raise ValueError(f"batch and width must be positive, got {batch}, {width}")
    full = batch * width
    size = max(1, smallest if smallest is not None else batch)
    out = []
    while size < full:
        out.append(size)
        size *= 2
    out.append(full)
    return tuple(out)


def flat_layout(counts: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Packs rows of ``counts [B]`` tokens into ``capacity`` flat slots.

    Returns ``(row, col)``, each ``[capacity]`` int32: slot ``t`` holds token ``col[t]`` of row ``row[t]``;
    slots past ``sum(counts)`` have ``row = -1`` (and ``col = 0``). Rows with ``counts = 0`` take no slot.
    """
    counts = counts.astype(jnp.int32)
    ends = jnp.cumsum(counts)
    t = jnp.arange(capacity, dtype=jnp.int32)
    row = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)
    valid = t < ends[-1]
    row_c = jnp.minimum(row, counts.shape[0] - 1)
    col = t - (ends[row_c] - counts[row_c])
    return jnp.where(valid, row_c, -1), jnp.where(valid, col, 0)


def verify_forward(target, seq: jax.Array, counts: jax.Array, cache: KVCache, tap_layer_ids: Sequence[int],
                   buckets: Sequence[int], *, padded_fallback: bool = False, branch: jax.Array | None = None):
    """Target logits and taps for the first ``counts[b]`` tokens of each row of ``seq [B, W]`` (row ``b``'s
    token ``i`` sits at position ``cache.lengths[b] + i``), computed on the smallest bucket that holds them.

    Returns ``(logits [B, W, V], taps [B, W, Lt*H] or None, cache)``; the cache has the verified tokens' keys
    written and its lengths unchanged (the caller commits). ``buckets`` must end with ``B * W`` unless
    ``padded_fallback``: then a round whose tokens exceed the largest bucket runs the padded ``[B, W]`` forward
    (a profile keeps only the buckets that beat it, so no round is slower than padded verification).
    ``branch``: optional traced int32 that overrides the choice (index into ``buckets``, ``len(buckets)`` = the
    padded forward); the round profile uses it to time every branch with the loop's own code.
    """
    b, w = seq.shape
    if not padded_fallback and (not buckets or buckets[-1] < b * w):
        raise ValueError(f"largest bucket {buckets[-1] if buckets else 0} < {b}x{w} tokens")
    start = cache.lengths
    vocab = target.config.vocab_size
    n_taps = len(tap_layer_ids)
    hidden = target.config.hidden_size

    def run(capacity):
        def branch(carry):
            c = carry[2]
            row, col = flat_layout(counts, capacity)
            safe = jnp.maximum(row, 0)
            out = target.forward_flat(seq[safe, col], row, start[safe] + col, c, tap_layer_ids=tap_layer_ids,
                                      layout=(col, w))
            dst = jnp.where(row >= 0, row, b)                      # padding slots scatter out of bounds: dropped
            logits = jnp.zeros((b, w, vocab), out.logits.dtype).at[dst, col].set(out.logits, mode="drop")
            taps = None
            if n_taps:
                taps = jnp.zeros((b, w, n_taps * hidden), out.taps.dtype).at[dst, col].set(out.taps, mode="drop")
            return logits, taps, out.cache
        return branch

    def padded(carry):
        # rows that verify nothing (finished) still write one padding key past their length: never attended
        out = target(seq, carry[2], num_new=jnp.maximum(counts, 1), tap_layer_ids=tap_layer_ids)
        return out.logits, out.taps, out.cache.with_lengths(start)

    branches = [run(cap) for cap in buckets] + ([padded] if padded_fallback else [])
    total = jnp.sum(counts)
    index = jnp.searchsorted(jnp.asarray(buckets if buckets else (0,), jnp.int32), total, side="left")
    if not buckets:
        index = jnp.int32(0)
    if branch is not None:
        index = branch
    if len(branches) == 1:
        return branches[0]((None, None, cache))
    logits_like, taps_like, _ = jax.eval_shape(lambda c: branches[0]((None, None, c)), cache)
    init = (jnp.zeros(logits_like.shape, logits_like.dtype),
            None if taps_like is None else jnp.zeros(taps_like.shape, taps_like.dtype), cache)
    return switch_in_place(index, branches, init)
