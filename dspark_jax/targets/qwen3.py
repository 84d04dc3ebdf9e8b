"""Qwen3 dense and Qwen3-MoE targets with tapped hidden states and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.cache import KVCache, write_rows
from dspark_jax.config import TargetConfig
from dspark_jax.nn.attention import Attention
from dspark_jax.nn.host import HostAttachment
from dspark_jax.nn.linear import embed, linear
from dspark_jax.nn.mlp import SwiGLU
from dspark_jax.nn.moe import MoE
from dspark_jax.nn.norm import RMSNorm
from dspark_jax.nn.rope import rope_cos_sin, rope_inv_freq
from dspark_jax.targets.base import StackedTarget


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TargetConfig, layer_idx: int, *, dtype, param_dtype, attention_impl, rngs):
        std = cfg.initializer_range
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   eps=cfg.rms_norm_eps, bias=cfg.attention_bias, dtype=dtype,
                                   param_dtype=param_dtype, init_std=std, attention_impl=attention_impl, rngs=rngs)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                           norm_topk_prob=cfg.norm_topk_prob, dtype=dtype, param_dtype=param_dtype, init_std=std,
                           rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                              init_std=std, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h, cos, sin, kv_cache, start, mask):
        """``h [B,S,H]``; ``kv_cache`` (k, v) ``[B,C,nkv,hd]`` or None; returns (h, (k, v) written)."""
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, cos, sin)
        k, v = self.self_attn.keys_values(x, cos, sin)
        if kv_cache is not None:
            k = write_rows(kv_cache[0], k, start)
            v = write_rows(kv_cache[1], v, start)
        h = h + self.self_attn.attend(q, k, v, mask)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (k, v)

    def flat_call(self, h, cos, sin, kv_cache, row, pos, layout=None):
        """Flattened tokens ``h [1,T,H]`` of cache rows ``row [T]`` (-1 = padding) at positions ``pos [T]``:
        writes their keys at ``(row, pos)``, attends causally within the row; returns (h, (k, v) caches)."""
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, cos, sin)[0]
        k, v = self.self_attn.keys_values(x, cos, sin)
        kc, vc = kv_cache
        dst = jnp.where(row >= 0, row, kc.shape[0])         # padding writes land out of bounds: dropped
        kc = kc.at[dst, pos].set(k[0].astype(kc.dtype), mode="drop")
        vc = vc.at[dst, pos].set(v[0].astype(vc.dtype), mode="drop")
        h = h + self.self_attn.attend_ragged(q, kc, vc, row, pos + 1, layout)[None]
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (kc, vc)


class Qwen3ForCausalLM(StackedTarget):
    """Qwen3 / Qwen3-MoE causal LM (``model_type`` 'qwen3' or 'qwen3_moe').

    ``config`` is the :class:`TargetConfig`; ``tokenizer`` is attached by ``load_target`` when the
    checkpoint directory has one (None otherwise).
    """

    def __init__(self, config: TargetConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not isinstance(config, TargetConfig):
            raise TypeError(f"config must be a TargetConfig, got {type(config).__name__}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self._host = HostAttachment()
        std = config.initializer_range
        self.embed_tokens = embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  init_std=std, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
            init_std=std, rngs=rngs)
        inv_freq, self.rope_scaling = rope_inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    def rope(self, positions: jax.Array):
        return rope_cos_sin(positions, np.asarray(self.rope_inv_freq, np.float32), self.rope_scaling)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        c = self.config
        return KVCache.create(c.num_hidden_layers, batch, capacity, c.num_key_value_heads, c.head_dim,
                              dtype or self.dtype)
