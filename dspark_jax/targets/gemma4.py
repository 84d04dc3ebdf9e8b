"""Gemma4 text decoder (transformers' ``Gemma4ForCausalLM``) with tapped hidden states and a KV cache.

What sets it apart from Qwen3, all reproduced here:
- two layer kinds: sliding-window layers (``head_dim``, ``num_key_value_heads``, plain RoPE) and full layers
  (``global_head_dim``, ``num_global_key_value_heads`` under ``attention_k_eq_v``, "proportional" RoPE that
  rotates only a fraction of the head);
- attention score scale 1.0 (q_norm/k_norm carry the scale), a scale-free RMS ``v_norm`` on values, and under
  ``attention_k_eq_v`` full layers have no v_proj (values are the raw k_proj output);
- sandwich norms around attention and MLP, then the whole block times a learned ``layer_scalar``;
- the word embedding is multiplied by ``sqrt(H)``; optional per-layer input embeddings (PLE) add a gated
  residual per layer; optional MoE branch next to the dense MLP; ``cap*tanh(logits/cap)`` softcapping;
- cross-layer K/V sharing (``num_kv_shared_layers``): the last layers reuse the keys/values of the last earlier
  layer of their type and have no K/V weights (optionally with a double-wide MLP).

The KV cache keeps every position for every layer (per-layer shapes differ); sliding layers mask keys older
than the window instead of evicting them, which keeps crop-by-length rollback exact.

Profile names (``jax.named_scope``): ``embed``, ``per_layer_inputs``, ``qkv``, ``attention``, ``o_proj``, ``mlp``,
``moe_router``, ``moe_experts``, ``lm_head`` (softcapping included).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import KVCache, causal_cache_mask, write_rows
from dspark_jax.config import ConfigError, RopeConfig
from dspark_jax.nn.attention import ragged_attend
from dspark_jax.nn.host import HostAttachment
from dspark_jax.nn.linear import embed, linear
from dspark_jax.nn.rope import apply_rope, rope_cos_sin
from dspark_jax.nn.segments import causal_segment_mask
from dspark_jax.targets.base import TargetBase, TargetOutput, check_flat_inputs
from dspark_jax.targets.gemma4_config import Gemma4Config

# ---- numerics shared with the Gemma4 draft ----------------------------------------------------

def gemma_rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """transformers' Gemma4RMSNorm: normalise and scale in fp32, then cast (the scale is ``w``, not ``1+w``)."""
    x32 = x.astype(jnp.float32)
    out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        out = out * weight.astype(jnp.float32)
    return out.astype(x.dtype)


class GemmaRMSNorm(nnx.Module):
    """``[..., dim] -> [..., dim]``; ``weight`` initialised to ones."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32, axis_name: str | None = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return gemma_rms_norm(x, self.weight[...], self.eps)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def gemma4_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """``[head_dim // 2]`` fp32 inverse frequencies for "default" or "proportional" RoPE.

    Proportional RoPE rotates the first ``partial_rotary_factor * head_dim / 2`` frequency pairs, with
    exponents over the *whole* head dim, and gives the rest frequency 0 (cos 1, sin 0: left unrotated)."""
    if rope.rope_type == "default":
        dim = int(head_dim * rope.partial_rotary_factor)
        inv = 1.0 / (np.float32(rope.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        return inv.astype(np.float32)
    if rope.rope_type == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        rotated = 1.0 / (np.float32(rope.rope_theta) **
                         (np.arange(0, 2 * angles, 2, dtype=np.float32) / np.float32(head_dim)))
        inv = np.concatenate([rotated.astype(np.float32), np.zeros(head_dim // 2 - angles, np.float32)])
        return (inv / np.float32(rope.factor if rope.factor is not None else 1.0)).astype(np.float32)
    raise ConfigError(f"rope_type {rope.rope_type!r} is not supported for Gemma4")


class Gemma4Attention(nnx.Module):
    """Projections of one Gemma4 attention layer; the caller owns positions, caches and masks.

    ``k_eq_v``: no v_proj, values are the k_proj output (before k_norm and RoPE), RMS-normalised without scale.
    ``in_features``: width q/k/v read (default ``hidden``; Eagle3 drafts read ``[emb ; hidden]``, 2H).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, k_eq_v: bool,
                 eps: float, bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 attention_impl: str = "auto", in_features: int | None = None, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps = eps
        self.scale = 1.0      # q_norm / k_norm carry the scale
        self.attention_impl = attention_impl
        mk = lambda i, o, axes: linear(i, o, axes, bias=bias, dtype=dtype, param_dtype=param_dtype,
                                       init_std=init_std, rngs=rngs)
        d_in = hidden if in_features is None else in_features
        self.q_proj = mk(d_in, num_heads * head_dim, ("embed", "heads"))
        self.k_proj = mk(d_in, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.v_proj = None if k_eq_v else mk(d_in, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.o_proj = mk(num_heads * head_dim, hidden, ("heads", "embed"))
        self.q_norm = GemmaRMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)
        self.k_norm = GemmaRMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """``x [B, S, H]`` -> q ``[B, S, nh, hd]`` normed and rotated."""
        with jax.named_scope("qkv"):
            q = self.q_proj(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)
            return apply_rope(self.q_norm(q), cos, sin)

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, H]`` -> (k, v) ``[B, T, nkv, hd]``: k normed and rotated, v scale-free RMS-normed."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        with jax.named_scope("qkv"):
            k_raw = self.k_proj(x).reshape(shape)
            v_raw = k_raw if self.v_proj is None else self.v_proj(x).reshape(shape)
            return apply_rope(self.k_norm(k_raw), cos, sin), gemma_rms_norm(v_raw, None, self.eps)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attention (score scale 1.0) then o_proj: ``q [B,S,nh,hd]``, ``k/v [B,T,nkv,hd]`` -> ``[B,S,H]``."""
        with jax.named_scope("attention"):
            o = kernels.attention(q, k, v, mask, self.scale, impl=self.attention_impl)
        return self.project_out(o)

    def attend_ragged(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, row: jax.Array, kv_len: jax.Array,
                      kv_start: jax.Array | None = None, layout: tuple[jax.Array, int] | None = None) -> jax.Array:
        """Ragged attention then o_proj (see :meth:`dspark_jax.nn.attention.Attention.attend_ragged`): token ``t``
        of ``q [T,nh,hd]`` sees slots ``[kv_start[t], kv_len[t])`` of cache row ``row[t]`` -> ``[T, H]``."""
        o = ragged_attend(q, k_cache, v_cache, row, kv_len, self.scale, self.attention_impl, layout, kv_start)
        return self.project_out(o)

    def project_out(self, o: jax.Array) -> jax.Array:
        """Attention output ``[..., nh, hd]`` (``[B,S,nh,hd]`` or ``[T,nh,hd]``) -> ``o_proj`` ``[..., H]``."""
        with jax.named_scope("o_proj"):
            return self.o_proj(o.reshape(*o.shape[:-2], self.num_heads * self.head_dim))


class Gemma4MLP(nnx.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden: int, intermediate: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        mk = lambda i, o, axes: linear(i, o, axes, dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
        self.gate_proj = mk(hidden, intermediate, ("embed", "mlp"))
        self.up_proj = mk(hidden, intermediate, ("embed", "mlp"))
        self.down_proj = mk(intermediate, hidden, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Gemma4Router(nnx.Module):
    """Scale-free RMS norm, times ``scale / sqrt(H)``, linear to E logits, fp32 softmax, top-k, renormalise,
    times ``per_expert_scale`` of the chosen experts."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float, *, dtype, param_dtype, init_std,
                 rngs: nnx.Rngs):
        self.top_k, self.eps, self.hidden = top_k, eps, hidden
        self.proj = linear(hidden, num_experts, ("embed", None), dtype=dtype, param_dtype=param_dtype,
                           init_std=init_std, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((hidden,), param_dtype), logical_axes=("norm",))
        self.per_expert_scale = nnx.Param(jnp.ones((num_experts,), param_dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [T, H]`` -> (weights ``[T, k]`` fp32, as transformers keeps them, expert ids ``[T, k]`` int32)."""
        with jax.named_scope("moe_router"):
            h = gemma_rms_norm(x, None, self.eps) * self.scale[...].astype(x.dtype) * jnp.asarray(
                self.hidden ** -0.5, x.dtype)
            probs = jax.nn.softmax(self.proj(h).astype(jnp.float32), axis=-1)
            top_p, top_idx = jax.lax.top_k(probs, self.top_k)
            top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
            top_p = top_p * self.per_expert_scale[...].astype(jnp.float32)[top_idx]
            return top_p, top_idx.astype(jnp.int32)


class Gemma4Experts(nnx.Module):
    """Fused experts in transformers' layout: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, *, dtype, param_dtype, init_std,
                 rngs: nnx.Rngs):
        self.intermediate, self.dtype = intermediate, dtype
        init = nnx.initializers.normal(init_std)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (num_experts, 2 * intermediate, hidden), param_dtype),
                                      logical_axes=("experts", "mlp", "embed"))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, intermediate), param_dtype),
                                   logical_axes=("experts", "embed", "mlp"))

    def __call__(self, tokens: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
        """``tokens [T, H]``, ``expert_ids/weights [T, k]`` -> ``[T, H]``: grouped matmuls over token copies
        sorted by expert (``ragged_dot``), so compute follows the routed tokens, not T x E."""
        num_tokens, k = expert_ids.shape
        with jax.named_scope("moe_experts"):
            gate_up = jnp.swapaxes(self.gate_up_proj[...].astype(self.dtype), 1, 2)       # [E, H, 2I]
            down = jnp.swapaxes(self.down_proj[...].astype(self.dtype), 1, 2)             # [E, I, H]
            flat = expert_ids.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            sorted_tokens = jnp.take(tokens.astype(self.dtype), order // k, axis=0)
            sizes = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
            gu = jax.lax.ragged_dot(sorted_tokens, gate_up, sizes)
            h = gelu_tanh(gu[:, :self.intermediate]) * gu[:, self.intermediate:]
            out = jax.lax.ragged_dot(h.astype(self.dtype), down, sizes)
            per_copy = jnp.zeros_like(out).at[order].set(out).reshape(num_tokens, k, -1)
            weighted = per_copy.astype(jnp.float32) * weights[..., None].astype(jnp.float32)
            return jnp.sum(weighted, axis=1).astype(tokens.dtype)


class Gemma4DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma4Config, layer_idx: int, *, dtype, param_dtype, attention_impl, rngs):
        std, h, eps = cfg.initializer_range, cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = cfg.is_sliding(layer_idx)
        self.reuses_kv = cfg.kv_sharing_modes[layer_idx] == "reuse"
        self.self_attn = Gemma4Attention(h, cfg.num_attention_heads, cfg.layer_num_kv_heads(layer_idx),
                                         cfg.layer_head_dim(layer_idx), k_eq_v=cfg.layer_k_eq_v(layer_idx), eps=eps,
                                         bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype,
                                         init_std=std, attention_impl=attention_impl, rngs=rngs)
        if self.reuses_kv:   # a K/V-sharing layer has no key/value weights of its own
            self.self_attn.k_proj = self.self_attn.v_proj = self.self_attn.k_norm = None
        self.mlp = Gemma4MLP(h, cfg.layer_intermediate_size(layer_idx), dtype=dtype, param_dtype=param_dtype,
                             init_std=std, rngs=rngs)
        norm = lambda: GemmaRMSNorm(h, eps, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.layer_scalar = nnx.Param(jnp.ones((1,), param_dtype), logical_axes=(None,))
        self.has_ple = cfg.hidden_size_per_layer_input > 0
        if self.has_ple:
            p = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = linear(h, p, ("embed", None), dtype=dtype, param_dtype=param_dtype,
                                               init_std=std, rngs=rngs)
            self.per_layer_projection = linear(p, h, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                                               init_std=std, rngs=rngs)
            self.post_per_layer_input_norm = norm()
        self.has_moe = cfg.enable_moe_block
        if self.has_moe:
            self.router = Gemma4Router(h, cfg.num_experts, cfg.top_k_experts, eps, dtype=dtype,
                                       param_dtype=param_dtype, init_std=std, rngs=rngs)
            self.experts = Gemma4Experts(h, cfg.moe_intermediate_size, cfg.num_experts, dtype=dtype,
                                         param_dtype=param_dtype, init_std=std, rngs=rngs)
            self.post_feedforward_layernorm_1 = norm()
            self.post_feedforward_layernorm_2 = norm()
            self.pre_feedforward_layernorm_2 = norm()

    def __call__(self, h, cos, sin, kv_cache, start, mask, per_layer_input, shared_kv=None):
        """``h [B,S,H]``; ``kv_cache`` (k, v) ``[B,C,nkv,hd]`` or None; ``per_layer_input [B,S,P]`` or None;
        ``shared_kv``: for a K/V-sharing layer, the (k, v) its source layer attended with (cache included).
        Returns (h, (k, v) as attended with)."""
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, cos, sin)
        if self.reuses_kv:
            k, v = shared_kv
        else:
            k, v = self.self_attn.keys_values(x, cos, sin)
            if kv_cache is not None:
                k = write_rows(kv_cache[0], k, start)
                v = write_rows(kv_cache[1], v, start)
        h = h + self.post_attention_layernorm(self.self_attn.attend(q, k, v, mask))
        return self._feed_forward(h, per_layer_input), (k, v)

    def flat_call(self, h, cos, sin, kv_cache, row, pos, kv_start, per_layer_input, shared_kv=None, layout=None):
        """Flattened tokens ``h [1,T,H]`` of cache rows ``row [T]`` (-1 = padding) at positions ``pos [T]``, each
        seeing its row's slots ``[kv_start, pos]``: writes their keys at ``(row, pos)`` (a K/V-sharing layer
        instead attends with ``shared_kv``, its source layer's written caches). Returns (h, (k, v) caches
        attended with)."""
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, cos, sin)[0]
        if self.reuses_kv:
            kc, vc = shared_kv
        else:
            k, v = self.self_attn.keys_values(x, cos, sin)
            kc, vc = kv_cache
            dst = jnp.where(row >= 0, row, kc.shape[0])        # padding writes land out of bounds: dropped
            kc = kc.at[dst, pos].set(k[0].astype(kc.dtype), mode="drop")
            vc = vc.at[dst, pos].set(v[0].astype(vc.dtype), mode="drop")
        o = self.self_attn.attend_ragged(q, kc, vc, row, pos + 1, kv_start, layout)[None]
        h = h + self.post_attention_layernorm(o)
        return self._feed_forward(h, per_layer_input), (kc, vc)

    def _feed_forward(self, h, per_layer_input):
        """Everything after attention: MLP (+ MoE), PLE residual, ``layer_scalar``."""
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.has_moe:
            # the expert branch reads the block input (not the dense MLP's normed input) and routes on it
            flat = h.reshape(-1, h.shape[-1])
            weights, ids = self.router(flat)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), ids, weights).reshape(h.shape)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(ff)

        if self.has_ple:
            g = gelu_tanh(self.per_layer_input_gate(h)) * per_layer_input.astype(h.dtype)
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar[...].astype(h.dtype)


def _scaled(x: jax.Array, scale: float, dtype) -> jax.Array:
    # transformers casts the fp32 scale to the weight dtype first (sqrt(3072) becomes 55.5 in bf16)
    return x * jnp.asarray(scale, jnp.float32).astype(dtype)


class Gemma4ForCausalLM(TargetBase):
    """Gemma4 causal LM (``model_type`` 'gemma4_text'; text part of 'gemma4'). Same interface as
    :class:`~dspark_jax.targets.qwen3.Qwen3ForCausalLM`: taps, KV cache, ``compute_logits``."""

    def __init__(self, config: Gemma4Config, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not isinstance(config, Gemma4Config):
            raise TypeError(f"config must be a Gemma4Config, got {type(config).__name__}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self._host = HostAttachment()
        c, std = config, config.initializer_range
        self.embed_tokens = embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, init_std=std,
                                  rngs=rngs)
        self.layers = nnx.List([Gemma4DecoderLayer(c, i, dtype=dtype, param_dtype=param_dtype,
                                                   attention_impl=attention_impl, rngs=rngs)
                                for i in range(c.num_hidden_layers)])
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else linear(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, init_std=std,
            rngs=rngs)
        p = c.hidden_size_per_layer_input
        if p:
            self.embed_tokens_per_layer = embed(c.vocab_size_per_layer_input, c.num_hidden_layers * p, dtype=dtype,
                                                param_dtype=param_dtype, init_std=std, rngs=rngs)
            self.per_layer_model_projection = linear(c.hidden_size, c.num_hidden_layers * p, ("embed", None),
                                                     dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
            self.per_layer_projection_norm = GemmaRMSNorm(p, c.rms_norm_eps, param_dtype=param_dtype, axis_name=None)
        self.rope_sliding_inv_freq = tuple(float(f) for f in gemma4_inv_freq(c.rope_sliding, c.head_dim))
        self.rope_full_inv_freq = tuple(float(f) for f in gemma4_inv_freq(c.rope_full, c.global_head_dim))

    # ---- pieces reused by drafts and decoding ------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, S]`` -> ``embed_tokens(ids) * sqrt(H)`` ``[B, S, H]``."""
        with jax.named_scope("embed"):
            return _scaled(self.embed_tokens(input_ids), self.config.hidden_size ** 0.5, self.param_dtype)

    def per_layer_inputs(self, input_ids: jax.Array, embeds: jax.Array) -> jax.Array | None:
        """PLE: ``[B, S, L, P]`` = (norm(proj(embeds)/sqrt(H)) + embed_per_layer(ids)*sqrt(P)) / sqrt(2)."""
        c = self.config
        p = c.hidden_size_per_layer_input
        if not p:
            return None
        with jax.named_scope("per_layer_inputs"):
            tok = _scaled(self.embed_tokens_per_layer(input_ids), p ** 0.5, self.param_dtype)
            tok = tok.reshape(*input_ids.shape, c.num_hidden_layers, p)
            proj = self.per_layer_model_projection(embeds) * jnp.asarray(c.hidden_size ** -0.5, embeds.dtype)
            proj = self.per_layer_projection_norm(proj.reshape(*embeds.shape[:-1], c.num_hidden_layers, p))
            return (proj + tok.astype(proj.dtype)) * jnp.asarray(2.0 ** -0.5, proj.dtype)

    def output_embedding(self) -> jax.Array:
        """The LM head as ``[V, H]`` (the input embedding when tied)."""
        return self.embed_tokens.embedding[...] if self.lm_head is None else self.lm_head.kernel[...].T

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., H]`` post-norm hidden -> softcapped ``[..., V]`` logits."""
        with jax.named_scope("lm_head"):
            raw = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
            return softcap(raw, self.config.final_logit_softcapping)

    def rope(self, positions: jax.Array, layer_type: str = "full_attention"):
        """``positions [...]`` -> (cos, sin) ``[..., hd]`` of that layer type's head dim and RoPE."""
        table = self.rope_sliding_inv_freq if layer_type == "sliding_attention" else self.rope_full_inv_freq
        return rope_cos_sin(positions, np.asarray(table, np.float32))

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """Per-layer ``[B, capacity, nkv_l, hd_l]`` buffers (sliding and full layers differ in shape)."""
        c, dt = self.config, dtype or self.dtype
        # a K/V-sharing layer reads its source layer's cache: its own entry is an empty placeholder
        shapes = [(batch, capacity, 0 if c.kv_sharing_modes[i] == "reuse" else c.layer_num_kv_heads(i),
                   c.layer_head_dim(i)) for i in range(c.num_hidden_layers)]
        return KVCache(tuple(jnp.zeros(s, dt) for s in shapes), tuple(jnp.zeros(s, dt) for s in shapes),
                       jnp.zeros((batch,), jnp.int32))

    # ---- forward ------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, cache: KVCache | None = None, *, num_new: jax.Array | None = None,
                 tap_layer_ids: Sequence[int] = (), logits_at: jax.Array | None = None,
                 return_logits: bool = True, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> TargetOutput:
        """Same contract as :meth:`Qwen3ForCausalLM.__call__`: ``input_ids [B, S]``; taps ``[B, S, Lt*H]``
        (``l`` = raw output of layer ``l`` = HF ``hidden_states[l+1]``, ``-1`` = the scaled embeddings);
        ``segment_ids`` / ``positions`` for packed rows (sliding windows count within a segment)."""
        if cache is not None and (segment_ids is not None or positions is not None):
            raise ValueError("segment_ids / positions are for a cache-less forward over packed rows")
        return self._forward(input_ids, cache, num_new, tap_layer_ids, logits_at, return_logits,
                             segment_ids=segment_ids, positions=positions)

    def prefill(self, input_ids: jax.Array, capacity: int, *, num_new: jax.Array | None = None,
                tap_layer_ids: Sequence[int] = (), logits_at: jax.Array | None = None,
                return_logits: bool = True) -> TargetOutput:
        """Same contract as :meth:`Qwen3ForCausalLM.prefill`: the prompt batch into a fresh cache of ``capacity``
        slots, attending within the prompt (``[S, S]``, sliding layers windowed) instead of against the empty
        cache; K/V-sharing layers keep their empty placeholder entries, as :meth:`init_cache` makes them."""
        b, s, lengths = self._prompt_shape(input_ids, capacity, num_new)
        out = self._forward(input_ids, None, None, tap_layer_ids, logits_at, return_logits, keep_kv=True)
        empty = self.init_cache(b, capacity)
        keys, values = out.cache
        reuse = [layer.reuses_kv for layer in self.layers]
        keys = [e if r else k for k, e, r in zip(keys, empty.keys, reuse)]
        values = [e if r else v for v, e, r in zip(values, empty.values, reuse)]
        return dataclasses.replace(out, cache=KVCache.from_prompt(keys, values, capacity, lengths, self.dtype))

    def _forward(self, input_ids, cache, num_new, tap_layer_ids, logits_at, return_logits,
                 keep_kv: bool = False, segment_ids=None, positions=None) -> TargetOutput:
        """The layer stack (``cache`` None: attention within the S tokens; with ``keep_kv`` the output's ``cache``
        field holds each layer's raw (keys, values))."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        taps_wanted = self.check_tap_layer_ids(tap_layer_ids)
        b, s = input_ids.shape
        window = self.config.sliding_window
        if cache is None:
            start = jnp.zeros((b,), jnp.int32)
            causal = jnp.tril(jnp.ones((s, s), bool))[None] if segment_ids is None else \
                causal_segment_mask(segment_ids)
            q_pos = jnp.arange(s)[None, :, None]
            kv_pos = jnp.arange(s)[None, None, :]
        else:
            if cache.batch != b:
                raise ValueError(f"cache batch {cache.batch} != input batch {b}")
            if cache.capacity < s:
                raise ValueError(f"cache capacity {cache.capacity} < {s} new tokens")
            start = cache.lengths
            causal = causal_cache_mask(start, s, cache.capacity)
            q_pos = (start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :])[:, :, None]
            kv_pos = jnp.arange(cache.capacity)[None, None, :]
        masks = {"full_attention": causal, "sliding_attention": causal & (kv_pos > q_pos - window)}
        if positions is None:
            positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        ropes = {t: self.rope(positions, t) for t in set(self.config.layer_types)}

        h = self.embed(input_ids)
        ple = self.per_layer_inputs(input_ids, h)
        tapped = {-1: h} if -1 in taps_wanted else {}
        new_keys, new_values = [], []
        attended = []   # per layer, the (k, v) it attended with: what a K/V-sharing layer reuses
        for i, layer in enumerate(self.layers):
            kind = self.config.layer_types[i]
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            shared = attended[self.config.kv_source(i)] if layer.reuses_kv else None
            h, (k, v) = layer(h, *ropes[kind], kv, start, masks[kind], None if ple is None else ple[:, :, i], shared)
            attended.append((k, v))
            new_keys.append(kv[0] if layer.reuses_kv and kv is not None else k)
            new_values.append(kv[1] if layer.reuses_kv and kv is not None else v)
            if i in taps_wanted:
                tapped[i] = h
        last_hidden = self.norm(h)

        new_cache = None
        if cache is not None:
            grow = jnp.full((b,), s, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
            new_cache = KVCache(tuple(new_keys), tuple(new_values), start + grow)
        elif keep_kv:
            new_cache = (tuple(new_keys), tuple(new_values))
        return self._output(last_hidden, tapped, taps_wanted, logits_at, return_logits, new_cache)

    def forward_flat(self, input_ids: jax.Array, row: jax.Array, pos: jax.Array, cache: KVCache, *,
                     tap_layer_ids: Sequence[int] = (), layout: tuple[jax.Array, int] | None = None) -> TargetOutput:
        """Same contract as :meth:`Qwen3ForCausalLM.forward_flat` (flattened ragged verification): ``input_ids``,
        ``row``, ``pos`` ``[T]``; returns softcapped logits ``[T, V]``, taps ``[T, Lt*H]``, last_hidden ``[T, H]``
        and the cache with the tokens' keys written at ``(row, pos)``, lengths unchanged."""
        check_flat_inputs(input_ids, row, pos)
        taps_wanted = self.check_tap_layer_ids(tap_layer_ids)
        pos = pos.astype(jnp.int32)
        # the padded path's sliding mask is kv_pos > q_pos - window: slots [pos - window + 1, pos]
        starts = {"full_attention": None,
                  "sliding_attention": jnp.maximum(pos - self.config.sliding_window + 1, 0)}
        ropes = {t: self.rope(pos[None], t) for t in set(self.config.layer_types)}
        h = self.embed(input_ids[None])
        ple = self.per_layer_inputs(input_ids[None], h)
        tapped = {-1: h} if -1 in taps_wanted else {}
        keys, values, attended = [], [], []
        for i, layer in enumerate(self.layers):
            kind = self.config.layer_types[i]
            shared = attended[self.config.kv_source(i)] if layer.reuses_kv else None
            h, (k, v) = layer.flat_call(h, *ropes[kind], (cache.keys[i], cache.values[i]), row, pos, starts[kind],
                                        None if ple is None else ple[:, :, i], shared, layout)
            attended.append((k, v))
            # a K/V-sharing layer's own cache entry stays the empty placeholder
            keys.append(cache.keys[i] if layer.reuses_kv else k)
            values.append(cache.values[i] if layer.reuses_kv else v)
            if i in taps_wanted:
                tapped[i] = h
        last_hidden = self.norm(h)[0]
        taps = jnp.concatenate([tapped[i][0] for i in taps_wanted], axis=-1) if taps_wanted else None
        return TargetOutput(logits=self.compute_logits(last_hidden), taps=taps, last_hidden=last_hidden,
                            cache=KVCache(tuple(keys), tuple(values), cache.lengths))
