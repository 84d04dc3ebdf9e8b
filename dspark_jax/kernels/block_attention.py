"""Training attention under the DSpark block mask (spec §1.5): the XLA reference and the dispatch.

Queries are N blocks of ``Bs`` slots; keys are ``[target context (S) ; block keys (N*Bs)]``. A query of block n
sees the context keys strictly before ``anchors[n]`` (and, in a packed row, at or after ``ctx_start[n]``, the
start of the anchor's segment) and every slot of its own block; blocks never see each other; a dropped block
(``block_keep`` False) sees nothing and returns zeros.

Model code does not call :func:`dspark_block_attention` directly: it passes a :class:`DSparkBlockMask` as the
``mask`` of :func:`dspark_jax.kernels.attention`, which routes it here, so the layers stay mask-agnostic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.kernels import _dispatch, block_attention_pallas
from dspark_jax.kernels.attention_xla import attention_reference, queries_as_rows, rows_as_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DSparkBlockMask:
    """The spec §1.5 mask in structured form: anchors ``[B, N]`` int, block_keep ``[B, N]`` bool, static
    ``block_size``; ctx_start ``[B, N]`` int or None (packed rows: block n sees context ``[ctx_start[n],
    anchors[n])``; None = from 0). ``dense(ctx_len)`` materialises the ``[B, N*Bs, S + N*Bs]`` boolean mask."""

    anchors: jax.Array
    block_keep: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))
    ctx_start: jax.Array | None = None

    def dense(self, ctx_len: int) -> jax.Array:
        return block_mask(self.anchors, self.block_keep, ctx_len, self.block_size, self.ctx_start)


def block_mask(anchors: jax.Array, block_keep: jax.Array, ctx_len: int, block_size: int,
               ctx_start: jax.Array | None = None) -> jax.Array:
    """Dense spec §1.5 mask ``[B, N*Bs, S + N*Bs]`` (same as ``drafts.backbone.training_mask``); ``ctx_start
    [B, N]``: the first context key each block sees (packed rows), None = 0."""
    b, n = anchors.shape
    q_block = jnp.repeat(jnp.arange(n), block_size)
    q_anchor = jnp.repeat(anchors, block_size, axis=1)
    q_keep = jnp.repeat(block_keep.astype(bool), block_size, axis=1)
    ctx = jnp.arange(ctx_len)[None, None, :] < q_anchor[:, :, None]
    if ctx_start is not None:
        ctx = ctx & (jnp.arange(ctx_len)[None, None, :] >= jnp.repeat(ctx_start, block_size, axis=1)[:, :, None])
    own = jnp.broadcast_to((q_block[:, None] == q_block[None, :])[None], (b, n * block_size, n * block_size))
    return jnp.concatenate([ctx, own], axis=-1) & q_keep[:, :, None]


def _check(q, k, v, anchors, block_keep, block_size):
    b, nq, nh, hd = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != hd or nh % k.shape[2]:
        raise ValueError(f"k/v {k.shape}/{v.shape} do not match q {q.shape}")
    n = anchors.shape[1]
    if anchors.shape != (b, n) or block_keep.shape != (b, n) or n * block_size != nq:
        raise ValueError(f"anchors {anchors.shape}/block_keep {block_keep.shape} x block_size {block_size} "
                         f"do not cover {nq} queries")
    if k.shape[1] < nq:
        raise ValueError(f"k has {k.shape[1]} keys, fewer than the {nq} block keys")


def dspark_block_attention_reference(q, k, v, anchors, block_keep, scale, *, block_size: int, ctx_start=None):
    """Dense-mask reference. q ``[B, N*Bs, nh, hd]``; k, v ``[B, S + N*Bs, nkv, hd]`` (context keys first, then
    the block keys in query order); anchors, block_keep (, ctx_start) ``[B, N]``. Returns ``[B, N*Bs, nh, hd]`` in
    q's dtype."""
    _check(q, k, v, anchors, block_keep, block_size)
    mask = block_mask(anchors.astype(jnp.int32), block_keep, k.shape[1] - q.shape[1], block_size, ctx_start)
    return attention_reference(q, k, v, mask, scale)


def dspark_block_attention_split(q, k_ctx, v_ctx, k_blk, v_blk, anchors, block_keep, scale, *, block_size: int,
                                 ctx_start=None):
    """The XLA path without the masked tiles of the dense reference: the same attention as
    :func:`dspark_block_attention_reference` over ``[k_ctx ; k_blk]``, computed as one softmax in two parts.

    The dense form scores every query against all ``N*Bs`` block keys, of which a query sees only its own block's
    ``Bs``: that is ``(N-1)/N`` of the block part of the scores, ~half of all attention work at N=64, S=512. Here
    the context part is ``[.., N*Bs, S]`` (masked by anchor) and the block part ``[.., N, Bs, Bs]`` (batched per
    block); the two share one max and one normaliser, and the keys are never concatenated.

    Args: q ``[B, N*Bs, nh, hd]``; k_ctx, v_ctx ``[B, S, nkv, hd]``; k_blk, v_blk ``[B, N*Bs, nkv, hd]`` (in query
    order); anchors, block_keep ``[B, N]``; ctx_start ``[B, N]`` or None (packed rows: each block's first
    visible context key). Returns ``[B, N*Bs, nh, hd]`` in q's dtype (0 for dropped blocks).
    """
    b, nq, nh, hd = q.shape
    s, nkv = k_ctx.shape[1], k_ctx.shape[2]
    n, g, bs = anchors.shape[1], nh // nkv, block_size
    if n * bs != nq or k_blk.shape[1] != nq:
        raise ValueError(f"anchors {anchors.shape} x block_size {bs} do not cover {nq} queries / {k_blk.shape} keys")
    f32, neg = jnp.float32, jnp.finfo(jnp.float32).min
    k_blk, v_blk = k_blk.astype(k_ctx.dtype), v_blk.astype(v_ctx.dtype)
    # context part, rows = (query, group) per kv head: [B, nkv, N*Bs*g, S]
    qm = queries_as_rows(q, nkv)
    s_ctx = jnp.einsum("bnmd,btnd->bnmt", qm, k_ctx, preferred_element_type=f32) * scale
    q_anchor = jnp.repeat(jnp.where(block_keep.astype(bool), anchors.astype(jnp.int32), 0), bs * g, axis=1)
    vis = jnp.arange(s, dtype=jnp.int32)[None, None, :] < q_anchor[:, :, None]
    if ctx_start is not None:
        q_lo = jnp.repeat(ctx_start.astype(jnp.int32), bs * g, axis=1)
        vis = vis & (jnp.arange(s, dtype=jnp.int32)[None, None, :] >= q_lo[:, :, None])
    vis = vis[:, None]                                                                        # [B, 1, rows, S]
    s_ctx = jnp.where(vis, s_ctx, neg)
    # block part: [B, nkv, N, Bs*g, Bs], each block's rows against its own keys
    qb = qm.reshape(b, nkv, n, bs * g, hd)
    kb = k_blk.reshape(b, n, bs, nkv, hd)
    vb = v_blk.reshape(b, n, bs, nkv, hd)
    s_blk = jnp.einsum("bnkmd,bktnd->bnkmt", qb, kb, preferred_element_type=f32) * scale
    keep = block_keep.astype(bool)[:, None, :, None, None]                                   # [B, 1, N, 1, 1]
    s_blk = jnp.where(keep, s_blk, neg)
    m_blk = jnp.max(s_blk, axis=-1).reshape(b, nkv, n * bs * g)
    m = jnp.maximum(jnp.max(s_ctx, axis=-1), m_blk)                                          # [B, nkv, rows]
    p_ctx = jnp.where(vis, jnp.exp(s_ctx - m[..., None]), 0.0)
    p_blk = jnp.where(keep, jnp.exp(s_blk - m.reshape(b, nkv, n, bs * g)[..., None]), 0.0)
    denom = jnp.sum(p_ctx, axis=-1) + jnp.sum(p_blk, axis=-1).reshape(b, nkv, n * bs * g)
    out = jnp.einsum("bnmt,btnd->bnmd", p_ctx.astype(v_ctx.dtype), v_ctx, preferred_element_type=f32)
    out = out + jnp.einsum("bnkmt,bktnd->bnkmd", p_blk.astype(v_blk.dtype), vb,
                           preferred_element_type=f32).reshape(b, nkv, n * bs * g, hd)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return rows_as_heads(out, nq).astype(q.dtype)


def dspark_block_attention(q, k, v, anchors, block_keep, scale, *, block_size: int, impl: str = "auto",
                           block_q: int | None = None, block_k: int | None = None, ctx_start=None):
    """Dispatches by ``impl`` (see :mod:`dspark_jax.kernels._dispatch`; XLA: :func:`dspark_block_attention_split`);
    same contract as :func:`dspark_block_attention_reference`. ``block_q``/``block_k`` override the Pallas tile sizes
    (queries / keys per tile). ``ctx_start``: packed rows (see :class:`DSparkBlockMask`); the Pallas kernel masks
    below it but still visits those tiles."""
    kind, target = _dispatch.resolve(impl, "dspark_block_attention")
    if kind == "xla":
        _check(q, k, v, anchors, block_keep, block_size)
        c = k.shape[1] - q.shape[1]
        return dspark_block_attention_split(q, k[:, :c], v[:, :c], k[:, c:], v[:, c:], anchors, block_keep, scale,
                                            block_size=block_size, ctx_start=ctx_start)
    _check(q, k, v, anchors, block_keep, block_size)
    return block_attention_pallas.block_attention_pallas(q, k, v, anchors.astype(jnp.int32), block_keep.astype(bool),
                                                         scale, block_size=block_size, target=target,
                                                         block_q=block_q, block_k=block_k, ctx_start=ctx_start)
