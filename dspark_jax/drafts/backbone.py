"""The parallel draft backbone's layer (spec §1.4) and the block attention masks (spec §1.5).

Target features are fused once (``ctx = hidden_norm(fc(taps))``) and injected into every layer as extra
keys/values, projected by that layer's own k_proj/v_proj (k_norm included, no input_layernorm). Block
queries attend, non-causally, to the context strictly before their anchor and to their own block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import write_rows
from dspark_jax.config import TargetConfig
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

    def __call__(self, h, block_rope, ctx, ctx_rope, mask, ctx_cache=None, cache_start=None):
        """Args:
          h: ``[B, Q, H]`` block hidden states; block_rope: (cos, sin) ``[B, Q, hd]``.
          ctx: ``[B, C, H]`` fused context features; ctx_rope: (cos, sin) ``[B, C, hd]``.
          mask: ``[B, Q, K + Q]`` where K = C (no cache) or the cache capacity.
          ctx_cache: optional (k, v) ``[B, cap, nkv, hd]``; new context keys are written at ``cache_start``.
        Returns: (h, (k_ctx, v_ctx)) with the context keys as stored (the cache buffers when given).
        """
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, *block_rope)
        k_blk, v_blk = self.self_attn.keys_values(x, *block_rope)
        k_ctx, v_ctx = self.self_attn.keys_values(ctx, *ctx_rope)
        if ctx_cache is not None:
            k_ctx = write_rows(ctx_cache[0], k_ctx, cache_start)
            v_ctx = write_rows(ctx_cache[1], v_ctx, cache_start)
        k = jnp.concatenate([k_ctx, k_blk.astype(k_ctx.dtype)], axis=1)
        v = jnp.concatenate([v_ctx, v_blk.astype(v_ctx.dtype)], axis=1)
        h = h + self.self_attn.attend(q, k, v, mask)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (k_ctx, v_ctx)


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
