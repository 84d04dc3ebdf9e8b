"""The prompt pass of the decode loops: a target forward over right-padded prompts into a fresh KV cache."""

from __future__ import annotations

from typing import Sequence

import jax


def prefill(target, ids: jax.Array, lengths: jax.Array, capacity: int, *, tap_layer_ids: Sequence[int] = ()):
    """``ids [B, P]`` (row ``b`` real up to ``lengths[b]``) -> the target's output with logits at each row's last
    prompt token ``[B, 1, V]`` and a cache of ``capacity`` slots holding the prompt (lengths = ``lengths``).

    Uses the target's ``prefill`` (attention within the prompt only) when it has one, else a forward against an
    empty cache; both give the same cache and logits."""
    logits_at = (lengths - 1)[:, None]
    if hasattr(target, "prefill"):
        return target.prefill(ids, capacity, num_new=lengths, tap_layer_ids=tap_layer_ids, logits_at=logits_at)
    return target(ids, target.init_cache(ids.shape[0], capacity), num_new=lengths, tap_layer_ids=tap_layer_ids,
                  logits_at=logits_at)
