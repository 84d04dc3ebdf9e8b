"""Anchor sampling for block training (spec §3.3 step 2), plain rows or packed rows (segment ids)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.nn.segments import segment_starts


def sample_anchors(loss_mask: jax.Array, num_anchors: int, key: jax.Array,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Draws up to ``num_anchors`` anchors per row uniformly without replacement from the valid positions.

    A position ``i`` is valid when ``loss_mask[i] and loss_mask[i+1]`` (the anchor and its first label are
    both supervised) and, in a packed row, ``i`` and ``i+1`` lie in the same segment. The kept
    ``K = min(#valid, N)`` anchors are sorted ascending into slots ``0..K-1``; the remaining slots are dummies
    (anchor 0, keep False).

    Packed rows (``segment_ids`` given): the row's budget ``N`` is shared out per segment by
    :func:`segment_quotas` (in proportion to each segment's valid positions) and each segment draws its quota
    uniformly from its own valid positions. A row holding one segment draws exactly the anchors of the
    unpacked path with the same key (same scores, same quota ``min(#valid, N)``).

    Args: loss_mask ``[B, S]``; key: a PRNG key; segment_ids ``[B, S]`` int (contiguous runs, any values) or None.
    Returns: (anchors ``[B, N]`` int32, block_keep ``[B, N]`` bool).
    """
    b, s = loss_mask.shape
    lm = loss_mask.astype(bool)
    nxt = lm[:, :-1] & lm[:, 1:]
    if segment_ids is not None:
        nxt = nxt & (segment_ids[:, :-1] == segment_ids[:, 1:])
    valid = jnp.concatenate([nxt, jnp.zeros((b, 1), bool)], axis=1)
    scores = jnp.where(valid, jax.random.uniform(key, (b, s)), 2.0)
    sentinel = jnp.iinfo(jnp.int32).max
    if segment_ids is None:
        order = jnp.argsort(scores, axis=1).astype(jnp.int32)
        if s < num_anchors:
            order = jnp.concatenate([order, jnp.full((b, num_anchors - s), s, jnp.int32)], axis=1)
        chosen = order[:, :num_anchors]
        count = jnp.minimum(jnp.sum(valid, axis=1), num_anchors)
        keep = jnp.arange(num_anchors)[None, :] < count[:, None]
        anchors = jnp.sort(jnp.where(keep, chosen, sentinel), axis=1)
        return jnp.where(keep, anchors, 0).astype(jnp.int32), keep
    start = segment_starts(segment_ids)                                             # [B, S]
    quota = segment_quotas(valid, start, num_anchors)                               # [B, S] by segment start
    # rank of each valid position among its segment's valid positions, by score
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    order = jnp.lexsort((scores, start), axis=1).astype(jnp.int32)                  # by segment, then score
    seg_sorted = jnp.take_along_axis(start, order, axis=1)
    first = jax.vmap(lambda x: jnp.searchsorted(x, x, side="left"))(seg_sorted).astype(jnp.int32)
    rank = pos - first
    picked = (rank < jnp.take_along_axis(quota, seg_sorted, axis=1)) & jnp.take_along_axis(valid, order, axis=1)
    anchors = jnp.sort(jnp.where(picked, order, sentinel), axis=1)
    if s < num_anchors:
        anchors = jnp.concatenate([anchors, jnp.full((b, num_anchors - s), sentinel, jnp.int32)], axis=1)
    anchors = anchors[:, :num_anchors]
    keep = anchors != sentinel
    return jnp.where(keep, anchors, 0).astype(jnp.int32), keep


def segment_quotas(valid: jax.Array, start: jax.Array, num_anchors: int) -> jax.Array:
    """Per-segment anchor quotas of a packed row, indexed by segment start: ``[B, S]`` int32 (0 off starts).

    Largest-remainder shares of the budget: segment ``k`` with ``v_k`` of the row's ``V`` valid positions gets
    ``floor(N * v_k / V)`` plus one if its remainder is among the ``min(V, N) - sum floor`` largest (ties: the
    earlier segment). The quotas sum to ``min(V, N)``, never exceed ``v_k`` (when ``N >= V`` every segment gets
    all of its ``v_k``), and a lone segment gets ``min(v, N)``.
    """
    b, s = valid.shape
    v = jax.vmap(lambda st, x: jax.ops.segment_sum(x, st, num_segments=s))(start, valid.astype(jnp.int32))
    total = jnp.maximum(jnp.sum(v, axis=1, keepdims=True), 1)
    budget = jnp.minimum(jnp.sum(v, axis=1), num_anchors)
    share = v * num_anchors
    base = jnp.minimum(v, share // total)
    rem = jnp.where(base < v, share % total, -1)          # -1: no room (never picked before a segment with room)
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    order = jnp.lexsort((idx, -rem), axis=1)              # largest remainder first, then earliest
    rank = jnp.argsort(order, axis=1)
    left = budget - jnp.sum(base, axis=1)
    give = (rem >= 0) & (rank < left[:, None])
    return (base + give).astype(jnp.int32)
