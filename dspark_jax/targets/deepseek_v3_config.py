"""DeepseekV3Config: the DeepSeek-V3 family's architecture (V3, V3.1, R1 and checkpoints that reuse it), read from
and written to HF ``config.json``.

Kept apart from :class:`~dspark_jax.config.TargetConfig` because the family's attention (MLA: low-rank queries, a
compressed key/value latent plus one shared RoPE key) and its MoE (sigmoid scores, a selection bias, group-limited
routing, shared experts, dense first layers) have fields Qwen3 configs have no words for. Field names follow
transformers' ``DeepseekV3Config``; the rope block is read in both spellings (``rope_parameters`` and the released
checkpoints' ``rope_scaling`` + ``rope_theta``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from dspark_jax.config import (
    ConfigError,
    HFConfig,
    RopeConfig,
    TargetConfig,
    _rope_from_hf,
    check_positive_ints,
    jsonable_ids,
    token_ids,
)

DEEPSEEK_V3_TYPES = ("deepseek_v3",)


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(HFConfig):
    """DeepSeek-V3 decoder (``DeepseekV3ForCausalLM``).

    Attention (MLA): queries come from ``q_proj`` (``q_lora_rank`` None) or ``q_b_proj(norm(q_a_proj(x)))``; keys
    and values from a latent of ``kv_lora_rank`` (normed) plus a shared RoPE key of ``qk_rope_head_dim``, up-projected
    per head to ``qk_nope_head_dim`` no-rope key dims and ``v_head_dim`` value dims. Layers ``< first_k_dense_replace``
    have a dense MLP (``intermediate_size``); the rest route each token to ``num_experts_per_tok`` of
    ``n_routed_experts`` (``moe_intermediate_size`` each) chosen within the ``topk_group`` best of ``n_group`` groups,
    plus ``n_shared_experts`` always-on experts.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_key_value_heads: int | None = None      # transformers keeps it; MLA keys/values are per attention head
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0            # multi-token-prediction layers stored after the decoder layers
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    model_type: str = "deepseek_v3"

    def __post_init__(self):
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values the KV cache keeps per token and layer: the latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN (DeepSeek's correction
        of the whole score, not only the rotary dims)."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.rope_type != "default" and r.mscale_all_dim:
            factor = r.factor or 1.0
            m = 1.0 if factor <= 1 else 0.1 * r.mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
        return scale

    @property
    def default_mask_token_id(self) -> int:
        """The draft's mask token by default: ``<｜place▁holder▁no▁0｜>`` (128000, the first of the 800 reserved,
        never-emitted ids of the family's 129,280-row vocabulary), else the last id."""
        return 128000 if self.vocab_size == 129280 else self.vocab_size - 1

    def active_matmul_params(self) -> int:
        """Weights of the decoder layers' matmuls one token goes through (of the routed experts, only the chosen
        ones): a forward costs ``2 *`` this many FLOPs per token, attention scores aside."""
        h, nh = self.hidden_size, self.num_attention_heads
        q = h * nh * self.qk_head_dim if self.q_lora_rank is None else \
            self.q_lora_rank * (h + nh * self.qk_head_dim)
        attn = q + h * self.latent_dim + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim) + \
            nh * self.v_head_dim * h
        dense = 3 * h * self.intermediate_size
        moe = 3 * h * self.moe_intermediate_size * (self.num_experts_per_tok + self.n_shared_experts) + \
            h * self.n_routed_experts
        return sum(attn + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """transformers' rule: every layer from ``first_k_dense_replace`` on is MoE."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    # ---- checks --------------------------------------------------------------------------
    def validate(self, where: str = "DeepseekV3Config") -> None:
        if self.model_type not in DEEPSEEK_V3_TYPES:
            raise ConfigError(f"{where}: model_type={self.model_type!r} is not a DeepSeek-V3 type {DEEPSEEK_V3_TYPES}")
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                   "v_head_dim"), where)
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"{where}: q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}: qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            # transformers' eager attention repeats keys by heads // kv_heads, which fails unless they are equal
            raise ConfigError(f"{where}: num_key_value_heads={self.num_key_value_heads} must equal "
                              f"num_attention_heads={self.num_attention_heads} (MLA keys are per head)")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}: hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{where}: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope.partial_rotary_factor != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported for DeepSeek-V3 "
                              "(qk_rope_head_dim already sets the rotary width)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"{where}: first_k_dense_replace={self.first_k_dense_replace} outside "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            raise ConfigError(f"{where}: n_routed_experts / n_shared_experts must be >= 0")
        if self.n_routed_experts:
            e = self.n_routed_experts
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{where}: moe_intermediate_size must be > 0 for an MoE model")
            if not isinstance(self.n_group, int) or self.n_group <= 0 or e % self.n_group:
                raise ConfigError(f"{where}: n_group={self.n_group} must be a positive divisor of "
                                  f"n_routed_experts={e}")
            if e // self.n_group < 2:
                # each group is scored by the sum of its two best experts
                raise ConfigError(f"{where}: n_routed_experts / n_group = {e // self.n_group} < 2 experts per group")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"{where}: topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if not 0 < self.num_experts_per_tok <= self.topk_group * (e // self.n_group):
                raise ConfigError(f"{where}: num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                                  f"topk_group * experts per group = {self.topk_group * (e // self.n_group)}]")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"{where}: num_nextn_predict_layers must be >= 0")

    # ---- HF conversion -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "DeepseekV3Config":
        d = dict(d)
        if d.get("model_type") not in DEEPSEEK_V3_TYPES:
            raise ConfigError(f"{where}: model_type={d.get('model_type')!r} is not a DeepSeek-V3 type "
                              f"{DEEPSEEK_V3_TYPES}")

        def integer(name, value):
            if isinstance(value, bool) or not (isinstance(value, int) or
                                               (isinstance(value, float) and value.is_integer())):
                raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
            return int(value)

        def req_int(name):
            if d.get(name) is None:
                raise ConfigError(f"{where}: missing field {name!r}")
            return integer(name, d[name])

        def opt_int(name, default):
            return default if d.get(name) is None else integer(name, d[name])

        heads = req_int("num_attention_heads")
        routed = opt_int("n_routed_experts", 0)
        kwargs = dict(
            vocab_size=req_int("vocab_size"),
            hidden_size=req_int("hidden_size"),
            intermediate_size=req_int("intermediate_size"),
            num_hidden_layers=req_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=opt_int("num_key_value_heads", None),
            kv_lora_rank=req_int("kv_lora_rank"),
            q_lora_rank=opt_int("q_lora_rank", None),
            qk_rope_head_dim=req_int("qk_rope_head_dim"),
            qk_nope_head_dim=req_int("qk_nope_head_dim"),
            v_head_dim=req_int("v_head_dim"),
            moe_intermediate_size=opt_int("moe_intermediate_size", 0),
            n_routed_experts=routed,
            n_shared_experts=opt_int("n_shared_experts", 0),
            num_experts_per_tok=opt_int("num_experts_per_tok", 0),
            n_group=opt_int("n_group", 1),
            topk_group=opt_int("topk_group", 1),
            first_k_dense_replace=opt_int("first_k_dense_replace", 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d, where),
            rope_interleave=bool(d.get("rope_interleave", True)),
            max_position_embeddings=opt_int("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            initializer_range=float(d.get("initializer_range", 0.02)),
            num_nextn_predict_layers=opt_int("num_nextn_predict_layers", opt_int("num_mtp_layers", 0)),
            bos_token_id=token_ids(d.get("bos_token_id")),
            eos_token_id=token_ids(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )
        return cls._from_fields(kwargs, where)

    def to_hf_dict(self) -> dict[str, Any]:
        rope = self.rope.to_hf()
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads if self.num_key_value_heads is None
            else self.num_key_value_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok,
            "first_k_dense_replace": self.first_k_dense_replace,
            "norm_topk_prob": self.norm_topk_prob,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            # the released checkpoints' spelling, which older transformers and vLLM read
            "rope_theta": self.rope.rope_theta,
            "rope_scaling": None if self.rope.rope_type == "default" else rope,
            "rope_interleave": self.rope_interleave,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "use_cache": True,
            "bos_token_id": jsonable_ids(self.bos_token_id),
            "eos_token_id": jsonable_ids(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }

    def draft_backbone(self) -> TargetConfig:
        """The Qwen3 layer geometry of a draft for this target by default: the target's hidden size, vocabulary,
        MLP width, norm epsilon, RoPE and context, with grouped-query attention of 128-wide heads (``hidden / 128``
        heads, 8 KV heads: 56 / 8 for the 671B model) where the hidden size allows, else the target's head count."""
        h = self.hidden_size
        if h % 128 == 0 and h >= 1024:
            head_dim, heads = 128, h // 128
        else:
            heads = self.num_attention_heads
            head_dim = h // heads if h % heads == 0 and (h // heads) % 2 == 0 else self.qk_nope_head_dim
        kv = max(d for d in range(1, min(8, heads) + 1) if heads % d == 0)
        return TargetConfig(model_type="qwen3", vocab_size=self.vocab_size, hidden_size=h,
                            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                            rms_norm_eps=self.rms_norm_eps, rope=self.rope,
                            max_position_embeddings=self.max_position_embeddings,
                            initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
                            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, dtype=self.dtype)

    def replace(self, **changes) -> "DeepseekV3Config":
        return dataclasses.replace(self, **changes)




def tiny_deepseek_v3_config(**overrides) -> DeepseekV3Config:
    """A small DeepSeek-V3 config (q low-rank, one dense layer then MoE with grouped routing) for demos and tests."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, rope=RopeConfig(rope_theta=1e4),
                max_position_embeddings=4096)
    base.update(overrides)
    return DeepseekV3Config(**base)
