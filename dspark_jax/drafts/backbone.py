"""The parallel draft backbone's layer (spec §1.4) and the block attention masks (spec §1.5).

Target features are fused once (``ctx = hidden_norm(fc(taps))``) and injected into every layer as extra
keys/values, projected by that layer's own k_proj/v_proj (k_norm included, no input_layernorm). Block
queries attend, non-causally, to the context strictly before their anchor and to their own block.

Profile names (``jax.named_scope``): ``qkv``, ``attention`` (cache writes and the kernel), ``o_proj``, ``mlp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import write_rows
from dspark_jax.config import TargetConfig
from dspark_jax.kernels._dispatch import resolve as resolve_impl
from dspark_jax.kernels.attention import queries_as_rows, rows_as_heads
from dspark_jax.nn.attention import Attention
from dspark_jax.nn.mlp import SwiGLU
from dspark_jax.nn.norm import RMSNorm


class DraftLayer(nnx.Module):
    """A Qwen3 pre-norm block whose attention sees ``[context ; block]`` keys."""

    def __init__(self, cfg: TargetConfig, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   eps=cfg.rms_norm_eps, bias=cfg.attention_bias, dtype=dtype,
                                   param_dtype=param_dtype, init_std=std, attention_impl=attention_impl, rngs=rngs)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                          init_std=std, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h, block_rope, ctx, ctx_rope, mask, ctx_cache=None, cache_start=None, block_start=None):
        """Args:
          h: ``[B, Q, H]`` block hidden states; block_rope: (cos, sin) ``[B, Q, hd]``.
          ctx: ``[B, C, H]`` fused context features; ctx_rope: (cos, sin) ``[B, C, hd]``.
          mask: ``[B, Q, C + Q]`` (or a ``DSparkBlockMask``) without a cache; unused with one.
          ctx_cache: optional (k, v) ``[B, cap, nkv, hd]``; new context keys are written at ``cache_start [B]``
            and the block sees slots ``< block_start [B]`` (see :func:`draft_attention`).
        Returns: (h, (k_ctx, v_ctx)) with the context keys as stored (the cache buffers when given).
        """
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, *block_rope)
        k_blk, v_blk = self.self_attn.keys_values(x, *block_rope)
        k_ctx, v_ctx = self.self_attn.keys_values(ctx, *ctx_rope)
        out, kv = draft_attention(self.self_attn, q, k_blk, v_blk, k_ctx, v_ctx, mask, ctx_cache, cache_start,
                                  block_start)
        h = h + out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv


def draft_attention(attn, q, k_blk, v_blk, k_ctx, v_ctx, mask, ctx_cache=None, cache_start=None, block_start=None):
    """A draft layer's attention, o_proj included: block queries see the context and their whole block.

    Args:
      attn: the layer's attention module (``attend``, ``o_proj``, ``scale``, ``attention_impl``, head counts).
      q: ``[B, Q, nh, hd]`` block queries; k_blk, v_blk: ``[B, Q, nkv, hd]`` the block's own keys/values.
      k_ctx, v_ctx: ``[B, C, nkv, hd]`` context keys/values (training: the whole sequence; inference: the
        pending rows, of which the first ``block_start - cache_start`` are real).
      mask: without a cache, the ``[B, Q, C + Q]`` mask (or ``DSparkBlockMask``) over ``[context ; block]``.
      ctx_cache: inference: (k, v) ``[B, cap, nkv, hd]``; the pending rows go to slots ``cache_start + i``.
      cache_start, block_start: ``[B]`` int32; the block sees cache slots ``< block_start`` (= the context
        length after this write) and sits at positions ``block_start ..``.

    Returns:
      (``[B, Q, H]``, (k, v)): the context as stored: the concatenation's context part without a cache, else the
      cache buffers. With the Pallas kernel those also hold the block's keys at ``[block_start, block_start + Q)``,
      beyond the row's length (the next round's writes overwrite them), so the caller needs ``block_start + Q <=
      cap``.
    """
    b, nq = q.shape[:2]
    if ctx_cache is None and isinstance(mask, kernels.DSparkBlockMask) and \
            resolve_impl(attn.attention_impl, "dspark_block_attention")[0] == "xla":
        # the two key parts where they lie: no [ctx ; block] copy forward, no pad/slice of it backward
        with jax.named_scope("attention"):
            o = kernels.dspark_block_attention_split(q, k_ctx, v_ctx, k_blk, v_blk, mask.anchors, mask.block_keep,
                                                     attn.scale, block_size=mask.block_size, ctx_start=mask.ctx_start)
        return _project_out(attn, o, b, nq), (k_ctx, v_ctx)
    if ctx_cache is None:
        with jax.named_scope("attention"):
            k = jnp.concatenate([k_ctx, k_blk.astype(k_ctx.dtype)], axis=1)
            v = jnp.concatenate([v_ctx, v_blk.astype(v_ctx.dtype)], axis=1)
        return attn.attend(q, k, v, mask), (k_ctx, v_ctx)
    kind, _ = resolve_impl(attn.attention_impl, "ragged_attention")
    with jax.named_scope("attention"):
        if kind == "pallas":
            cap = ctx_cache[0].shape[1]
            _check_block_room(block_start, nq, cap)
            count = block_start - cache_start
            kc = _write_context_and_block(ctx_cache[0], k_ctx, k_blk, cache_start, count, block_start)
            vc = _write_context_and_block(ctx_cache[1], v_ctx, v_blk, cache_start, count, block_start)
            row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), nq)
            kv_len = jnp.repeat(block_start.astype(jnp.int32) + nq, nq)
            o = kernels.ragged_attention(q.reshape(b * nq, *q.shape[2:]), kc, vc, row, kv_len, attn.scale,
                                         impl=attn.attention_impl)
        else:
            # the old [cache ; block] concatenation copied the whole cache per layer per round: attend to the two
            # parts where they lie instead
            kc = write_rows(ctx_cache[0], k_ctx, cache_start)
            vc = write_rows(ctx_cache[1], v_ctx, cache_start)
            o = cached_block_attention_reference(q, kc, vc, block_start, k_blk, v_blk, attn.scale)
    return _project_out(attn, o, b, nq), (kc, vc)


def _project_out(attn, o: jax.Array, b: int, nq: int) -> jax.Array:
    """Attention output (``[B, Q, nh, hd]`` or ``[B*Q, nh, hd]``) -> the layer's o_proj, ``[B, Q, H]``."""
    with jax.named_scope("o_proj"):
        return attn.o_proj(o.reshape(b, nq, attn.num_heads * attn.head_dim))


def cached_block_attention_reference(q, k_cache, v_cache, ctx_len, k_blk, v_blk, scale):
    """Block attention over a context cache and the block, as one softmax split in two parts.

    Equals ``attention_reference(q, [k_cache ; k_blk], [v_cache ; v_blk], inference_mask(ctx_len, cap, Q))``
    without building the concatenation: the two score blocks share one max and one normaliser.

    Args:
      q: ``[B, Q, nh, hd]``; k_cache, v_cache: ``[B, cap, nkv, hd]``; ctx_len: ``[B]`` (slots ``< ctx_len`` are
        visible); k_blk, v_blk: ``[B, Q, nkv, hd]`` (all visible to every query).
    Returns: ``[B, Q, nh, hd]`` in q's dtype.
    """
    s = q.shape[1]
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    # softmax along the key axis, normaliser after the products: the layout of kernels.attention_reference
    qm = queries_as_rows(q, nkv)
    k_blk, v_blk = k_blk.astype(k_cache.dtype), v_blk.astype(v_cache.dtype)
    s_ctx = jnp.einsum("bnmd,btnd->bnmt", qm, k_cache, preferred_element_type=jnp.float32) * scale
    s_blk = jnp.einsum("bnmd,btnd->bnmt", qm, k_blk, preferred_element_type=jnp.float32) * scale
    vis = (jnp.arange(cap)[None, :] < ctx_len[:, None])[:, None, None, :]                 # [B, 1, 1, cap]
    s_ctx = jnp.where(vis, s_ctx, jnp.finfo(jnp.float32).min)
    # the block is always visible, so the shared max is finite and the normaliser >= 1
    m = jnp.maximum(jnp.max(s_ctx, axis=-1, keepdims=True), jnp.max(s_blk, axis=-1, keepdims=True))
    p_ctx = jnp.where(vis, jnp.exp(s_ctx - m), 0.0)
    p_blk = jnp.exp(s_blk - m)
    denom = jnp.sum(p_ctx, axis=-1, keepdims=True) + jnp.sum(p_blk, axis=-1, keepdims=True)
    out = (jnp.einsum("bnmt,btnd->bnmd", p_ctx.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
           + jnp.einsum("bnmt,btnd->bnmd", p_blk.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32))
    out = out / denom
    return rows_as_heads(out, s).astype(q.dtype)


def _write_context_and_block(buf, ctx, blk, cache_start, count, block_start):
    """One scatter: the first ``count [B]`` rows of ``ctx [B, P, ...]`` at ``cache_start + i`` and ``blk [B, Q, ...]``
    at ``block_start + j`` of ``buf [B, cap, ...]`` (context padding rows are not written)."""
    b, p = ctx.shape[:2]
    nq = blk.shape[1]
    cap = buf.shape[1]
    i = jnp.arange(p, dtype=jnp.int32)
    ctx_slots = jnp.where(i[None, :] < count[:, None], cache_start[:, None] + i[None, :], cap)   # cap: dropped
    blk_slots = block_start[:, None] + jnp.arange(nq, dtype=jnp.int32)[None, :]
    slots = jnp.concatenate([ctx_slots, blk_slots], axis=1)
    new = jnp.concatenate([ctx.astype(buf.dtype), blk.astype(buf.dtype)], axis=1)
    return buf.at[jnp.arange(b)[:, None], slots].set(new, mode="drop")


def _check_block_room(block_start, num_slots: int, capacity: int) -> None:
    """The Pallas path keeps the block's keys in the cache after the context: they must fit."""
    if num_slots > capacity:
        raise ValueError(f"draft cache capacity {capacity} < {num_slots} block slots")
    try:
        need = int(jnp.max(block_start)) + num_slots
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return     # inside jit the caller's sizing must guarantee it (speculative_generate leaves room)
    if need > capacity:
        raise ValueError(f"draft cache capacity {capacity} has no room for the block's keys: a row's context "
                         f"ends at {need - num_slots} and the block needs {num_slots} more slots (the Pallas "
                         f"inference path stores them after the context; size the cache context + block slots)")


def training_mask(anchors: jax.Array, block_keep: jax.Array, seq_len: int, block_size: int) -> jax.Array:
    """Spec §1.5: ``[B, N*Bs, S + N*Bs]`` bool.

    Query in block b sees context keys ``kv < anchors[b]`` (the anchor's own column excluded) and every
    slot of its own block; blocks never see each other; dropped blocks (``block_keep`` False) see nothing.
    """
    b, n = anchors.shape
    q_block = jnp.repeat(jnp.arange(n), block_size)                              # [Q]
    q_anchor = jnp.repeat(anchors, block_size, axis=1)                           # [B, Q]
    q_keep = jnp.repeat(block_keep, block_size, axis=1)                          # [B, Q]
    ctx = jnp.arange(seq_len)[None, None, :] < q_anchor[:, :, None]              # [B, Q, S]
    own = (q_block[:, None] == q_block[None, :])[None]                           # [1, Q, Q]
    mask = jnp.concatenate([ctx, jnp.broadcast_to(own, (b,) + own.shape[1:])], axis=-1)
    return mask & q_keep[:, :, None]


def inference_mask(ctx_lengths: jax.Array, capacity: int, block_size: int) -> jax.Array:
    """``[B, Bs, cap + Bs]``: every block query sees cache slots ``< ctx_lengths[b]`` and the whole block."""
    ctx = jnp.arange(capacity)[None, :] < ctx_lengths[:, None]                   # [B, cap]
    full = jnp.concatenate([ctx, jnp.ones((ctx.shape[0], block_size), bool)], axis=-1)
    return jnp.broadcast_to(full[:, None, :], (ctx.shape[0], block_size, capacity + block_size))
