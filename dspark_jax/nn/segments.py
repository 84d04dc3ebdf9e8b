"""Packed rows: several sequences share one row, told apart by segment ids (contiguous runs of equal ids).

Shared by the target's causal forward, the draft's block mask and anchor sampling, so every attention that
reads a packed row stops at the same segment boundaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, S]`` -> ``[B, S]`` int32: the index where each position's segment (contiguous run of equal ids)
    starts."""
    s = segment_ids.shape[1]
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, jnp.arange(s, dtype=jnp.int32), 0), axis=1)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, S]`` -> ``[B, S, S]`` bool: query ``i`` sees key ``j <= i`` of its own segment."""
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))[None]
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
