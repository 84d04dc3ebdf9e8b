"""Ragged verify / decode attention over per-row KV caches: the dispatch between the XLA reference
(:mod:`dspark_jax.kernels.ragged_attention_xla`, whose doc states the contract; re-exported here) and the Pallas
kernel (:mod:`dspark_jax.kernels.ragged_attention_pallas`)."""

from __future__ import annotations

from dspark_jax.kernels import _dispatch, ragged_attention_pallas
from dspark_jax.kernels.ragged_attention_xla import _normalise, ragged_attention_reference


def ragged_attention(q, k_cache, v_cache, row, kv_len, scale, *, kv_start=None, impl: str = "auto"):
    """Dispatches by ``impl`` (``"auto"|"xla"|"pallas"``, see :mod:`dspark_jax.kernels._dispatch`); same contract
    as :func:`ragged_attention_reference`."""
    kind, target = _dispatch.resolve(impl, "ragged_attention")
    if kind == "xla":
        return ragged_attention_reference(q, k_cache, v_cache, row, kv_len, scale, kv_start=kv_start)
    row, kv_len, kv_start = _normalise(q, k_cache, v_cache, row, kv_len, kv_start)
    return ragged_attention_pallas.ragged_attention_pallas(q, k_cache, v_cache, row, kv_start, kv_len, scale,
                                                           target=target)
