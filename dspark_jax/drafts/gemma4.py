"""DSpark / DFlash / Eagle3 drafts for Gemma4 targets (spec §2; DeepSpec's ``Gemma4DSparkModel`` and
``Gemma4Eagle3Model``).

Same block drafting, heads, masks and losses as the Qwen3 draft (drafts/dspark.py); the differences are all in
the layer and at the vocab edges:
- every draft layer uses the target's *full-attention* geometry: ``global_head_dim`` and, under
  ``attention_k_eq_v``, ``num_global_key_value_heads`` with no v_proj (values = raw k_proj output); values
  get a scale-free RMS ``v_norm``; the score scale is 1.0; RoPE is the full layers' (proportional) RoPE;
- sandwich norms (``post_attention_layernorm`` after attention, ``pre/post_feedforward_layernorm`` around the
  gelu-tanh MLP), then the block output times ``layer_scalar`` (a saved, untrained [1] tensor);
- the embedding is scaled by ``sqrt(H)``; logits are softcapped (``cap*tanh(x/cap)``) for both the draft's
  base logits and the aligned target logits, and the Markov bias is added after the cap (the train outputs carry
  the cap as ``softcap`` so the vocab-chunked losses, which rebuild logits from hidden states, apply it too).

The Eagle3 draft is the Qwen3 one (drafts/eagle3.py: TTT training, chain drafting) with the same Gemma4 layer
and vocab-edge changes; its layer keeps Eagle3's ``[input_layernorm(emb) ; hidden_norm(h)]`` 2H input.

The draft's ``config.arch`` is a :class:`Gemma4Config` (the target's text config with D full-attention layers,
untied, and no MoE / per-layer inputs, which DeepSpec asserts off for drafts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import KVCache
from dspark_jax.config import ConfigError
from dspark_jax.drafts.backbone import draft_attention
from dspark_jax.drafts.config import (
    GEMMA4_ARCH_OF,
    GEMMA4_ARCHITECTURES,
    GEMMA4_DSPARK_ARCH,
    GEMMA4_EAGLE3_ARCH,
    DraftConfig,
)
from dspark_jax.drafts.dspark import DSparkDraft
from dspark_jax.drafts.eagle3 import EAGLE3_NUM_TAPS, Eagle3Draft
from dspark_jax.drafts.gemma4_config import gemma4_draft_arch
from dspark_jax.nn.frozen import Frozen
from dspark_jax.targets.gemma4 import (
    Gemma4Attention,
    Gemma4MLP,
    GemmaRMSNorm,
    gemma4_inv_freq,
    softcap,
)
from dspark_jax.targets.gemma4_config import Gemma4Config


def bind_gemma4(config: DraftConfig, target: Gemma4Config) -> DraftConfig:
    """:meth:`DraftConfig.bind` for a Gemma4 target: fills ``arch`` and names the architecture
    (Gemma4DSparkModel for DSpark / DFlash, Gemma4Eagle3Model for Eagle3)."""
    t = target.num_hidden_layers
    if config.target_layer_ids[-1] >= t - 1:
        raise ConfigError(f"target_layer_ids {list(config.target_layer_ids)} exceed what a {t}-layer target "
                          f"allows (ids must be < {t - 1}: the last layer may not be tapped)")
    if config.num_target_layers is not None and config.num_target_layers != t:
        raise ConfigError(f"draft num_target_layers={config.num_target_layers} but the target has {t} layers")
    arch = gemma4_draft_arch(target, config.num_draft_layers)
    if isinstance(config.arch, Gemma4Config):
        for f in ("hidden_size", "vocab_size", "num_attention_heads", "global_head_dim", "full_num_kv_heads",
                  "attention_k_eq_v"):
            if getattr(config.arch, f) != getattr(target, f):
                raise ConfigError(f"draft {f}={getattr(config.arch, f)} does not match the target's "
                                  f"{getattr(target, f)}")
        arch = config.arch
    elif config.arch is not None:
        raise ConfigError("a Gemma4 target needs a draft whose arch is a Gemma4Config (or None)")
    return dataclasses.replace(config, arch=arch, num_target_layers=t,
                               architecture=GEMMA4_ARCH_OF[config.architecture])


def is_gemma4_draft_config(config: DraftConfig) -> bool:
    return config.architecture in GEMMA4_ARCHITECTURES or isinstance(config.arch, Gemma4Config)


class Gemma4DraftLayer(nnx.Module):
    """A Gemma4 sandwich-norm block whose attention sees ``[context ; block]`` keys (full-attention geometry)."""

    def __init__(self, arch: Gemma4Config, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        std, h, eps = arch.initializer_range, arch.hidden_size, arch.rms_norm_eps
        self.self_attn = Gemma4Attention(h, arch.num_attention_heads, arch.full_num_kv_heads, arch.global_head_dim,
                                         k_eq_v=arch.attention_k_eq_v, eps=eps, bias=arch.attention_bias,
                                         dtype=dtype, param_dtype=param_dtype, init_std=std,
                                         attention_impl=attention_impl, rngs=rngs)
        self.mlp = Gemma4MLP(h, arch.intermediate_size, dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        norm = lambda: GemmaRMSNorm(h, eps, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        # a buffer in DeepSpec: saved with the weights, never trained
        self.layer_scalar = Frozen(jnp.ones((1,), param_dtype), logical_axes=(None,))

    def __call__(self, h, block_rope, ctx, ctx_rope, mask, ctx_cache=None, cache_start=None, block_start=None):
        """Same contract as :class:`~dspark_jax.drafts.backbone.DraftLayer` (context rows skip input_layernorm)."""
        x = self.input_layernorm(h)
        q = self.self_attn.queries(x, *block_rope)
        k_blk, v_blk = self.self_attn.keys_values(x, *block_rope)
        k_ctx, v_ctx = self.self_attn.keys_values(ctx, *ctx_rope)
        out, kv = draft_attention(self.self_attn, q, k_blk, v_blk, k_ctx, v_ctx, mask, ctx_cache, cache_start,
                                  block_start)
        h = h + self.post_attention_layernorm(out)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar[...].astype(h.dtype), kv


class Gemma4DSparkDraft(DSparkDraft):
    """DSpark / DFlash draft for a Gemma4 target. ``config`` must be bound (``config.arch`` a Gemma4Config)."""

    architectures = (GEMMA4_DSPARK_ARCH,)
    norm_class = GemmaRMSNorm
    layer_class = Gemma4DraftLayer

    def __init__(self, config: DraftConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not isinstance(config.arch, Gemma4Config):
            raise ValueError("Gemma4DSparkDraft needs a bound config whose arch is a Gemma4Config "
                             "(use dj.build_draft(gemma4_target, config))")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)

    def init_rope(self) -> None:
        arch = self.config.arch
        self.rope_inv_freq = tuple(float(f) for f in gemma4_inv_freq(arch.rope_full, arch.global_head_dim))
        self.rope_scaling = 1.0

    def embed(self, ids: jax.Array) -> jax.Array:
        """``embed_tokens[ids] * sqrt(H)`` (the scale cast to the table's dtype first, as transformers does)."""
        table = self.embed_tokens[...]
        scale = jnp.asarray(self.config.arch.hidden_size ** 0.5, jnp.float32).astype(table.dtype)
        return (jnp.take(table, ids, axis=0) * scale).astype(self.dtype)

    def base_logits(self, hidden: jax.Array, head_hv: jax.Array | None = None) -> jax.Array:
        """``softcap(lm_head(hidden))`` ``[..., V]`` (draft logits before the Markov bias, and target logits)."""
        return softcap(super().base_logits(hidden, head_hv), self.config.arch.final_logit_softcapping)

    def train_forward(self, input_ids, loss_mask, target_hidden, target_last_hidden, anchors, block_keep, *,
                      materialize_logits: bool = True, remat: str = "none", segment_ids=None, positions=None):
        out = super().train_forward(input_ids, loss_mask, target_hidden, target_last_hidden, anchors, block_keep,
                                    materialize_logits=materialize_logits, remat=remat, segment_ids=segment_ids,
                                    positions=positions)
        # the vocab-chunked loss rebuilds logits as hidden @ lm_head: it must know to apply the cap
        return dataclasses.replace(out, softcap=self.config.arch.final_logit_softcapping)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        a = self.config.arch
        return KVCache.create(self.config.num_draft_layers, batch, capacity, a.full_num_kv_heads, a.global_head_dim,
                              dtype or self.dtype)


# ---- Eagle3 (DeepSpec's Gemma4Eagle3Model) --------------------------------------------------------------------

class Gemma4Eagle3Layer(nnx.Module):
    """The Eagle3 layer with Gemma4 pieces: q/k/v read ``[input_layernorm(emb) ; hidden_norm(h)]`` (2H) with the
    full-attention geometry, the residual is the un-normalised ``h``, sandwich norms, then ``* layer_scalar``."""

    def __init__(self, arch: Gemma4Config, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        std, h, eps = arch.initializer_range, arch.hidden_size, arch.rms_norm_eps
        self.self_attn = Gemma4Attention(h, arch.num_attention_heads, arch.full_num_kv_heads, arch.global_head_dim,
                                         k_eq_v=arch.attention_k_eq_v, eps=eps, bias=arch.attention_bias,
                                         dtype=dtype, param_dtype=param_dtype, init_std=std,
                                         attention_impl=attention_impl, in_features=2 * h, rngs=rngs)
        self.mlp = Gemma4MLP(h, arch.intermediate_size, dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        norm = lambda: GemmaRMSNorm(h, eps, param_dtype=param_dtype)
        self.hidden_norm = norm()
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.layer_scalar = Frozen(jnp.ones((1,), param_dtype), logical_axes=(None,))

    def qkv(self, emb, h, cos, sin):
        """``emb, h [B,S,H]`` -> q ``[B,S,nh,hd]``, k/v ``[B,S,nkv,hd]`` (normed; q, k rotated)."""
        dt = emb.dtype
        x = jnp.concatenate([self.input_layernorm(emb).astype(dt), self.hidden_norm(h).astype(dt)], axis=-1)
        q = self.self_attn.queries(x, cos, sin)
        k, v = self.self_attn.keys_values(x, cos, sin)
        return q, k, v

    def finish(self, h, attn):
        """``attn``: the o_proj output ``[B,S,H]``; returns the layer output ``[B,S,H]``."""
        h = h + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar[...].astype(h.dtype)


class Gemma4Eagle3Draft(Eagle3Draft):
    """Eagle3 draft for a Gemma4 target (TTT training, chain drafting and caches as :class:`Eagle3Draft`);
    scaled embedding, softcapped draft and target logits, full-attention RoPE and geometry."""

    architectures = (GEMMA4_EAGLE3_ARCH,)
    norm_class = GemmaRMSNorm

    def make_layer(self, arch, **kwargs):
        return Gemma4Eagle3Layer(arch, **kwargs)

    def __init__(self, config: DraftConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if not isinstance(config.arch, Gemma4Config):
            raise ValueError("Gemma4Eagle3Draft needs a bound Eagle3 config whose arch is a Gemma4Config")
        self.check_architecture(config)
        if config.num_taps != EAGLE3_NUM_TAPS or any(i < 0 for i in config.target_layer_ids):
            raise ValueError(f"Eagle3 expects exactly {EAGLE3_NUM_TAPS} non-negative target_layer_ids, got "
                             f"{list(config.target_layer_ids)}")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)

    # RoPE, scaled embedding and cache geometry are the DSpark draft's (both use the full-attention layout)
    init_rope = Gemma4DSparkDraft.init_rope
    embed = Gemma4DSparkDraft.embed
    init_cache = Gemma4DSparkDraft.init_cache

    def base_logits(self, hidden: jax.Array, head_hv: jax.Array | None = None) -> jax.Array:
        return softcap(super().base_logits(hidden, head_hv), self.config.arch.final_logit_softcapping)

    def train_forward(self, input_ids, loss_mask, target_hidden, target_last_hidden, attention_mask=None, *,
                      materialize_logits: bool = True):
        out = super().train_forward(input_ids, loss_mask, target_hidden, target_last_hidden, attention_mask,
                                    materialize_logits=materialize_logits)
        return dataclasses.replace(out, softcap=self.config.arch.final_logit_softcapping)
