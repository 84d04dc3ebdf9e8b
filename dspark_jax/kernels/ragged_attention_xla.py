"""Ragged verify / decode attention over per-row KV caches in plain jnp: the XLA reference (the contract of
:mod:`dspark_jax.kernels.ragged_attention`'s dispatch and the backward of its Pallas kernel).

Query tokens of many rows are flattened into one ``[T, nh, hd]`` array; each token names the cache row it reads
(``row``, -1 = padding) and the half-open slot range ``[kv_start, kv_len)`` of that row it sees. Causal target
verification gives a token at position p ``kv_len = p + 1``; a draft block sees ``ctx_count + block_len`` slots
(non-causal within the block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The reference gathers each token's cache row; past this many bytes of gathered keys it maps over token chunks.
_GATHER_BUDGET_BYTES = 256 * 1024 * 1024


def _ragged_chunk(q, k_cache, v_cache, row, kv_start, kv_len, scale):
    t, nh, hd = q.shape
    r, c, nkv, _ = k_cache.shape
    g = nh // nkv
    valid = row >= 0
    safe = jnp.clip(row, 0, r - 1)
    pos = jnp.arange(c, dtype=jnp.int32)
    vis = (pos[None, :] >= kv_start[:, None]) & (pos[None, :] < kv_len[:, None]) & valid[:, None]  # [T, C]
    k = k_cache[safe]                                                                              # [T, C, nkv, hd]
    v = v_cache[safe]
    qg = q.reshape(t, nkv, g, hd)
    scores = jnp.einsum("tngd,tcnd->tngc", qg, k, preferred_element_type=jnp.float32) * scale
    m = vis[:, None, None, :]
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.where(m, jnp.exp(scores), 0.0)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    probs = unnorm / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("tngc,tcnd->tngd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(t, nh, hd).astype(q.dtype)


def _normalise(q, k_cache, v_cache, row, kv_len, kv_start):
    t, nh, hd = q.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [R, C, nkv, hd]; got {k_cache.shape}, {v_cache.shape}")
    if k_cache.shape[3] != hd or nh % k_cache.shape[2]:
        raise ValueError(f"q {q.shape} does not match cache {k_cache.shape} (head_dim, nh % nkv)")
    if row.shape != (t,) or kv_len.shape != (t,):
        raise ValueError(f"row {row.shape} and kv_len {kv_len.shape} must be [{t}]")
    row = row.astype(jnp.int32)
    kv_len = kv_len.astype(jnp.int32)
    kv_start = jnp.zeros_like(kv_len) if kv_start is None else kv_start.astype(jnp.int32)
    if kv_start.shape != (t,):
        raise ValueError(f"kv_start {kv_start.shape} must be [{t}]")
    return row, kv_len, kv_start


def ragged_attention_reference(q, k_cache, v_cache, row, kv_len, scale, *, kv_start=None):
    """Pure-jnp ragged attention (see the module doc for the contract).

    Args:
      q: ``[T, nh, hd]`` flattened query tokens (RoPE applied).
      k_cache, v_cache: ``[R, C, nkv, hd]`` per-row caches, new tokens already written in; ``nh % nkv == 0``.
      row: ``[T]`` int32 cache row of each token; -1 = padding (output exactly 0).
      kv_len: ``[T]`` int32; the token sees slots ``[kv_start, kv_len)`` of its row.
      scale: score multiplier.
      kv_start: ``[T]`` int32 or None (= 0).

    Returns:
      ``[T, nh, hd]`` in q's dtype; a token with no visible slot gets exactly 0, never NaN.
    """
    row, kv_len, kv_start = _normalise(q, k_cache, v_cache, row, kv_len, kv_start)
    t = q.shape[0]
    per_token = k_cache.shape[1] * k_cache.shape[2] * k_cache.shape[3] * jnp.dtype(k_cache.dtype).itemsize * 2
    if t * per_token <= _GATHER_BUDGET_BYTES or t <= 1:
        return _ragged_chunk(q, k_cache, v_cache, row, kv_start, kv_len, scale)
    batch = max(1, _GATHER_BUDGET_BYTES // per_token)
    return jax.lax.map(lambda xs: _ragged_chunk(xs[0][None], k_cache, v_cache, xs[1][None], xs[2][None],
                                                xs[3][None], scale)[0],
                       (q, row, kv_start, kv_len), batch_size=batch)
