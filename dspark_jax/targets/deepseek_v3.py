"""DeepSeek-V3-family target (transformers' ``DeepseekV3ForCausalLM``): multi-head latent attention with a
compressed-latent KV cache, and DeepSeekMoE.

MLA. Per token, ``kv_a_proj_with_mqa`` gives a latent ``c`` (``kv_lora_rank``, then RMS-normed) and one RoPE key
``k_pe`` (``qk_rope_head_dim``) shared by every head; ``kv_b_proj`` up-projects ``c`` to per-head no-rope keys and
values. The cache keeps ``[c ; k_pe]`` only (``latent_dim`` values per token and layer, in ``KVCache.keys``; the
``values`` entries are zero-width placeholders). Two ways to attend, equal in exact arithmetic:

- *expanded* (prompt passes, and cached forwards of several tokens, as transformers does): up-project the keys and
  values of every attended token and run ordinary attention (head dims ``qk_head_dim`` / ``v_head_dim``);
- *absorbed* (one-token decode and the flat ragged verification of the decode loop): fold ``kv_b_proj``'s key half
  into the queries (``q_nope W_uk`` lives in latent space), attend over the cached ``[c ; k_pe]`` as one shared
  key/value head, and apply the value half ``W_uv`` to the attention output. This reads only the latent cache and
  never makes per-head keys or values.

DeepSeekMoE. Layers ``>= first_k_dense_replace``: sigmoid router scores (fp32), a per-expert correction bias used
for *selection only*, group-limited top-k (the ``topk_group`` groups whose two best biased scores sum highest),
weights = unbiased scores of the chosen experts (renormalised under ``norm_topk_prob``) times
``routed_scaling_factor``; routed experts as grouped matmuls over tokens sorted by expert (as Qwen3-MoE), plus the
shared experts on every token.

Profile names (``jax.named_scope``): ``qkv`` (query, latent and up-projections, absorbed queries), ``attention``,
``o_proj`` (W_uv included), ``moe_router``, ``moe_experts``, ``moe_shared``; ``mlp`` for dense layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import KVCache, write_rows
from dspark_jax.nn.attention import ragged_attend
from dspark_jax.nn.host import HostAttachment
from dspark_jax.nn.linear import embed, linear
from dspark_jax.nn.mlp import SwiGLU
from dspark_jax.nn.moe import grouped_experts
from dspark_jax.nn.norm import RMSNorm
from dspark_jax.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq
from dspark_jax.targets.base import StackedTarget
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config


def deinterleave(x: jax.Array) -> jax.Array:
    """``[..., d]`` pairs ``(x0, x1), (x2, x3), ...`` -> ``[x0, x2, ... ; x1, x3, ...]``: interleaved RoPE is then the
    rotate-half RoPE (transformers' ``apply_rotary_pos_emb_interleave`` gives the same values in this layout)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAttention(nnx.Module):
    """Multi-head latent attention of one layer; the caller owns positions, the latent cache and masks."""

    def __init__(self, cfg: DeepseekV3Config, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        self.scale = cfg.softmax_scale
        self.attention_impl = attention_impl
        std, bias = cfg.initializer_range, cfg.attention_bias
        mk = lambda i, o, axes, b=False: linear(i, o, axes, bias=b, dtype=dtype, param_dtype=param_dtype,
                                                init_std=std, rngs=rngs)
        h, nh, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = mk(h, nh * qk, ("embed", "heads"))
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_a_proj = mk(h, cfg.q_lora_rank, ("embed", None), bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name=None)
            self.q_b_proj = mk(cfg.q_lora_rank, nh * qk, (None, "heads"))
            self.q_proj = None
        self.kv_a_proj_with_mqa = mk(h, cfg.latent_dim, ("embed", None), bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, param_dtype=param_dtype, axis_name=None)
        self.kv_b_proj = mk(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), (None, "heads"))
        self.o_proj = mk(nh * cfg.v_head_dim, h, ("heads", "embed"), bias)

    def _rotate(self, x, cos, sin):
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, S, H]`` -> (q_nope ``[B, S, nh, nope]``, q_pe ``[B, S, nh, rope]`` rotated)."""
        with jax.named_scope("qkv"):
            q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            q = q.reshape(*x.shape[:-1], self.num_heads, self.nope + self.rope_dim)
            return q[..., :self.nope], self._rotate(q[..., self.nope:], cos, sin)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """``x [B, S, H]`` -> what the cache keeps, ``[B, S, 1, rank + rope]``: the normed latent, then the rotated
        shared RoPE key."""
        with jax.named_scope("qkv"):
            kv = self.kv_a_proj_with_mqa(x)
            c = self.kv_a_layernorm(kv[..., :self.rank])
            k_pe = self._rotate(kv[..., self.rank:][..., None, :], cos, sin)
            return jnp.concatenate([c[..., None, :], k_pe.astype(c.dtype)], axis=-1)

    def _up_weights(self) -> tuple[jax.Array, jax.Array]:
        """``kv_b_proj`` split per head: (W_uk ``[rank, nh, nope]``, W_uv ``[rank, nh, v]``)."""
        w = self.kv_b_proj.kernel[...].astype(self.kv_b_proj.dtype)
        w = w.reshape(self.rank, self.num_heads, self.nope + self.v_dim)
        return w[..., :self.nope], w[..., self.nope:]

    def attend_expanded(self, q_nope, q_pe, latent, mask) -> jax.Array:
        """Up-projected attention: ``q_* [B, S, nh, *]``, ``latent [B, T, 1, rank + rope]``, ``mask [B, S, T]`` ->
        ``[B, S, H]``."""
        with jax.named_scope("qkv"):
            c, k_pe = latent[..., 0, :self.rank], latent[..., :, self.rank:]
            kv = self.kv_b_proj(c).reshape(*c.shape[:-1], self.num_heads, self.nope + self.v_dim)
            k = jnp.concatenate([kv[..., :self.nope], jnp.broadcast_to(k_pe, (*kv.shape[:-1], self.rope_dim))], -1)
            q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        with jax.named_scope("attention"):
            o = kernels.attention(q, k.astype(q.dtype), kv[..., self.nope:], mask, self.scale, impl="xla")
        with jax.named_scope("o_proj"):
            return self.o_proj(o.reshape(*o.shape[:2], self.num_heads * self.v_dim))

    def absorbed_queries(self, q_nope, q_pe) -> jax.Array:
        """``[..., nh, nope]``, ``[..., nh, rope]`` -> queries in latent space ``[..., nh, rank + rope]``."""
        with jax.named_scope("qkv"):
            w_uk, _ = self._up_weights()
            q_lat = jnp.einsum("...hn,rhn->...hr", q_nope, w_uk.astype(q_nope.dtype),
                               precision=jax.lax.Precision.HIGHEST)
            return jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)

    def project_latent_out(self, o_latent: jax.Array) -> jax.Array:
        """Attention output in latent space ``[..., nh, rank + rope]`` -> ``[..., H]`` (W_uv, then o_proj; the RoPE
        part of the output is the value-less tail and is dropped)."""
        with jax.named_scope("o_proj"):
            _, w_uv = self._up_weights()
            o = jnp.einsum("...hr,rhv->...hv", o_latent[..., :self.rank], w_uv.astype(o_latent.dtype),
                           precision=jax.lax.Precision.HIGHEST)
            return self.o_proj(o.reshape(*o.shape[:-2], self.num_heads * self.v_dim))

    def attend_absorbed(self, q_nope, q_pe, latent, mask) -> jax.Array:
        """Absorbed attention over the latent cache (one shared key/value head; the values are the keys, whose
        RoPE tail :meth:`project_latent_out` drops): same contract as :meth:`attend_expanded`."""
        q = self.absorbed_queries(q_nope, q_pe)
        with jax.named_scope("attention"):
            o = kernels.attention(q, latent.astype(q.dtype), latent.astype(q.dtype), mask, self.scale, impl="xla")
        return self.project_latent_out(o)

    def attend_absorbed_ragged(self, q_nope, q_pe, cache, row, kv_len, layout=None) -> jax.Array:
        """Flattened tokens ``q_* [T, nh, *]`` of cache rows ``row [T]`` see slots ``[0, kv_len[t])`` of the latent
        cache ``[R, C, 1, rank + rope]`` -> ``[T, H]``."""
        q = self.absorbed_queries(q_nope, q_pe)
        o = ragged_attend(q, cache.astype(q.dtype), cache.astype(q.dtype), row, kv_len, self.scale, "xla", layout)
        return self.project_latent_out(o)


class DeepseekMoE(nnx.Module):
    """``[B, S, H] -> [B, S, H]``: routed experts (group-limited sigmoid top-k) plus shared experts.

    Params: ``gate.kernel [H, E]`` and ``gate.e_score_correction_bias [E]`` (both fp32, as transformers keeps them);
    ``gate_proj/up_proj [E, H, I]``, ``down_proj [E, I, H]``; ``shared_experts`` a SwiGLU of ``n_shared * I``.
    """

    def __init__(self, cfg: DeepseekV3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k = e, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.dtype = dtype
        std = cfg.initializer_range
        init = nnx.initializers.normal(std)
        self.gate = RouterGate(h, e, init_std=std, rngs=rngs)
        up_axes, down_axes = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
        self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype), logical_axes=up_axes)
        self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype), logical_axes=up_axes)
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), param_dtype), logical_axes=down_axes)
        self.shared_experts = SwiGLU(h, i * cfg.n_shared_experts, dtype=dtype, param_dtype=param_dtype, init_std=std,
                                     rngs=rngs) if cfg.n_shared_experts else None

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [T, H]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]`` int32)."""
        with jax.named_scope("moe_router"):
            scores = jax.nn.sigmoid(self.gate(x))                                       # [T, E] fp32
            choice = scores + self.gate.e_score_correction_bias[...].astype(jnp.float32)
            t = x.shape[0]
            grouped = choice.reshape(t, self.n_group, self.num_experts // self.n_group)
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)               # [T, G]
            _, best_groups = jax.lax.top_k(group_scores, self.topk_group)
            keep = jnp.any(jax.nn.one_hot(best_groups, self.n_group, dtype=bool), axis=1)  # [T, G]
            choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, self.num_experts)
            _, idx = jax.lax.top_k(choice, self.top_k)
            weights = jnp.take_along_axis(scores, idx, axis=-1)
            if self.norm_topk_prob:
                weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
            return weights * self.routed_scaling_factor, idx.astype(jnp.int32)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, hidden = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, hidden)
        weights, expert_ids = self.route(tokens)
        out = grouped_experts(tokens.astype(self.dtype), expert_ids, weights.astype(self.dtype),
                              self.gate_proj[...].astype(self.dtype), self.up_proj[...].astype(self.dtype),
                              self.down_proj[...].astype(self.dtype)).reshape(*lead, hidden)
        if self.shared_experts is None:
            return out
        with jax.named_scope("moe_shared"):
            return out + self.shared_experts(x)


class RouterGate(nnx.Module):
    """The router's fp32 ``kernel [H, E]`` and ``e_score_correction_bias [E]``: ``x [T, H]`` -> logits ``[T, E]``
    fp32."""

    def __init__(self, hidden: int, num_experts: int, *, init_std: float, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), (hidden, num_experts), jnp.float32), logical_axes=("embed", None))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((num_experts,), jnp.float32), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)


class DeepseekV3DecoderLayer(nnx.Module):
    def __init__(self, cfg: DeepseekV3Config, layer_idx: int, *, dtype, param_dtype, attention_impl, rngs):
        self.self_attn = MLAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                     rngs=rngs)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                              init_std=cfg.initializer_range, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h, cos, sin, kv_cache, start, mask):
        """``h [B,S,H]``; ``kv_cache`` (latent ``[B,C,1,rank+rope]``, zero-width placeholder) or None; returns
        (h, (latent, placeholder)): the S tokens' own latents without a cache, else the updated cache buffers.

        One new token per row attends in the absorbed form; several (a prompt, a verify block) up-project."""
        x = self.input_layernorm(h)
        attn = self.self_attn
        q_nope, q_pe = attn.queries(x, cos, sin)
        lat = attn.latent(x, cos, sin)
        if kv_cache is None:
            placeholder = jnp.zeros((*lat.shape[:3], 0), lat.dtype)
            h = h + attn.attend_expanded(q_nope, q_pe, lat, mask)
            return h + self.mlp(self.post_attention_layernorm(h)), (lat, placeholder)
        cache = write_rows(kv_cache[0], lat, start)
        attend = attn.attend_absorbed if h.shape[1] == 1 else attn.attend_expanded
        h = h + attend(q_nope, q_pe, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h)), (cache, kv_cache[1])

    def flat_call(self, h, cos, sin, kv_cache, row, pos, layout=None):
        """Flattened tokens ``h [1,T,H]`` of cache rows ``row [T]`` (-1 = padding) at positions ``pos [T]``: writes
        their latents at ``(row, pos)``, attends (absorbed) causally within the row; returns (h, cache entries)."""
        x = self.input_layernorm(h)
        attn = self.self_attn
        q_nope, q_pe = attn.queries(x, cos, sin)
        lat = attn.latent(x, cos, sin)
        cache = kv_cache[0]
        dst = jnp.where(row >= 0, row, cache.shape[0])        # padding writes land out of bounds: dropped
        cache = cache.at[dst, pos].set(lat[0].astype(cache.dtype), mode="drop")
        h = h + attn.attend_absorbed_ragged(q_nope[0], q_pe[0], cache, row, pos + 1, layout)[None]
        return h + self.mlp(self.post_attention_layernorm(h)), (cache, kv_cache[1])


class DeepseekV3ForCausalLM(StackedTarget):
    """DeepSeek-V3-family causal LM (``model_type`` 'deepseek_v3'). Same interface as the other targets: taps,
    ``prefill``, cached forwards, ``forward_flat``; its KV cache keeps the MLA latent (see the module docstring)."""

    def __init__(self, config: DeepseekV3Config, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not isinstance(config, DeepseekV3Config):
            raise TypeError(f"config must be a DeepseekV3Config, got {type(config).__name__}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self._host = HostAttachment()
        c, std = config, config.initializer_range
        self.embed_tokens = embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, init_std=std,
                                  rngs=rngs)
        self.layers = nnx.List([DeepseekV3DecoderLayer(c, i, dtype=dtype, param_dtype=param_dtype,
                                                       attention_impl=attention_impl, rngs=rngs)
                                for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else linear(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, init_std=std,
            rngs=rngs)
        inv_freq, self.rope_scaling = rope_inv_freq(c.rope, c.qk_rope_head_dim, c.max_position_embeddings)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    def rope(self, positions: jax.Array):
        """``positions [...]`` -> (cos, sin) ``[..., qk_rope_head_dim]`` (YaRN's attention factor folded in)."""
        return rope_cos_sin(positions, np.asarray(self.rope_inv_freq, np.float32), self.rope_scaling)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """Per layer a latent buffer ``[B, capacity, 1, kv_lora_rank + qk_rope_head_dim]`` and a zero-width
        ``values`` placeholder (MLA has no separate values to keep)."""
        c, dt = self.config, dtype or self.dtype
        n = c.num_hidden_layers
        return KVCache(tuple(jnp.zeros((batch, capacity, 1, c.latent_dim), dt) for _ in range(n)),
                       tuple(jnp.zeros((batch, capacity, 1, 0), dt) for _ in range(n)),
                       jnp.zeros((batch,), jnp.int32))
