"""Masked grouped-query attention: the XLA reference and the dispatch point for kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.kernels._dispatch import IMPLS, check_impl  # noqa: F401  (IMPLS re-exported)


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
    qg = q.reshape(b, s, nkv, groups, hd)
    scores = jnp.einsum("bsngd,btnd->bngst", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        m = mask[:, None, None, :, :]
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        scores = scores - jnp.max(scores, axis=-1, keepdims=True)
        unnorm = jnp.where(m, jnp.exp(scores), 0.0)
        denom = jnp.sum(unnorm, axis=-1, keepdims=True)
        probs = unnorm / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bngst,btnd->bsngd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, nh, hd).astype(q.dtype)


def attention(q, k, v, mask, scale, impl: str = "auto"):
    """Dispatches by ``impl`` (``"auto"|"xla"|"pallas"``); same contract as :func:`attention_reference`.

    ``mask`` may be a dense boolean array (always the XLA reference: there is no generic dense-mask kernel) or a
    structured :class:`~dspark_jax.kernels.block_attention.DSparkBlockMask` (the training block mask, spec §1.5),
    which goes to :func:`~dspark_jax.kernels.block_attention.dspark_block_attention` and so to the Pallas kernel
    when ``impl`` resolves to Pallas.
    """
    check_impl(impl, "attention")
    from dspark_jax.kernels.block_attention import DSparkBlockMask, dspark_block_attention
    if isinstance(mask, DSparkBlockMask):
        return dspark_block_attention(q, k, v, mask.anchors, mask.block_keep, scale, block_size=mask.block_size,
                                      impl=impl)
    return attention_reference(q, k, v, mask, scale)
