"""Anchor sampling for block training (spec §3.3 step 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_anchors(loss_mask: jax.Array, num_anchors: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws up to ``num_anchors`` anchors per row uniformly without replacement from the valid positions.

    A position ``i`` is valid when ``loss_mask[i] and loss_mask[i+1]`` (the anchor and its first label are
    both supervised). The kept ``K = min(#valid, N)`` anchors are sorted ascending into slots ``0..K-1``;
    the remaining slots are dummies (anchor 0, keep False).

    Args: loss_mask ``[B, S]``; key: a PRNG key. Returns: (anchors ``[B, N]`` int32, block_keep ``[B, N]`` bool).
    """
    b, s = loss_mask.shape
    lm = loss_mask.astype(bool)
    valid = jnp.concatenate([lm[:, :-1] & lm[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    scores = jnp.where(valid, jax.random.uniform(key, (b, s)), 2.0)
    order = jnp.argsort(scores, axis=1).astype(jnp.int32)
    if s < num_anchors:
        order = jnp.concatenate([order, jnp.full((b, num_anchors - s), s, jnp.int32)], axis=1)
    chosen = order[:, :num_anchors]
    count = jnp.minimum(jnp.sum(valid, axis=1), num_anchors)
    keep = jnp.arange(num_anchors)[None, :] < count[:, None]
    sentinel = jnp.iinfo(jnp.int32).max
    anchors = jnp.sort(jnp.where(keep, chosen, sentinel), axis=1)
    return jnp.where(keep, anchors, 0).astype(jnp.int32), keep
