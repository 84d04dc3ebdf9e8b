"""Masked grouped-query attention in plain jnp: the XLA reference and its ``[B, nkv, rows, hd]`` layout helpers.

Split from :mod:`dspark_jax.kernels.attention` (the dispatch) so that the block-mask attention, which the dispatch
routes to, can import the reference without an import cycle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def queries_as_rows(q: jax.Array, nkv: int) -> jax.Array:
    """``[B, S, nh, hd]`` -> ``[B, nkv, S * g, hd]``: one kv head's queries (g = nh // nkv per head) as matmul rows.

    With this layout the score and value products are plain ``[rows, hd] x [hd, T]`` and ``[rows, T] x [T, hd]``
    matmuls and XLA:CPU transposes neither the probabilities nor the V cache per layer (measured in commit
    5d67a95).
    """
    b, s, nh, hd = q.shape
    return q.reshape(b, s, nkv, nh // nkv, hd).transpose(0, 2, 1, 3, 4).reshape(b, nkv, s * (nh // nkv), hd)


def rows_as_heads(out: jax.Array, s: int) -> jax.Array:
    """Inverse of :func:`queries_as_rows`: ``[B, nkv, S * g, hd]`` -> ``[B, S, nkv * g, hd]``."""
    b, nkv, rows, hd = out.shape
    g = rows // s
    return out.reshape(b, nkv, s, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, s, nkv * g, hd)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """Grouped-query attention with a boolean mask.

    Args:
      q: ``[B, S, nh, hd]`` queries (RoPE applied).
      k, v: ``[B, T, nkv, hd]`` keys and values, ``nh % nkv == 0``.
      mask: ``[B, S, T]`` (or broadcastable, e.g. ``[1, S, T]``) True where a query may attend; None = all.
      scale: score multiplier (``hd ** -0.5`` for Qwen3).

    Returns:
      ``[B, S, nh, hd]`` in q's dtype. A query whose mask row is all False gets exactly 0 (as torch's
      flex_attention does), never NaN.
    """
    b, s, nh, hd = q.shape
    nkv = k.shape[2]
    groups = nh // nkv
    # Softmax along the contiguous key axis and the normaliser applied to the [rows, hd] output: with the bsngd
    # output order XLA:CPU transposed the probabilities and the whole V cache on every layer (decode steps ~16%
    # and 4-token verify forwards ~16-30% slower at the demo geometry; commit 5d67a95).
    qm = queries_as_rows(q, nkv)
    scores = jnp.einsum("bnmd,btnd->bnmt", qm, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        t = k.shape[1]
        m = jnp.broadcast_to(mask[:, None, :, None, :], (mask.shape[0], 1, s, 1, t))
        scores = scores.reshape(b, nkv, s, groups, t)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    unnorm = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    if mask is not None:
        unnorm = jnp.where(m, unnorm, 0.0).reshape(b, nkv, s * groups, t)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = jnp.einsum("bnmt,btnd->bnmd", unnorm.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return rows_as_heads(out, s).astype(q.dtype)
