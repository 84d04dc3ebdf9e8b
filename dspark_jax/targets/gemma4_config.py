"""Gemma4Config: the Gemma4 text decoder's architecture, read from and written to HF ``config.json``.

Kept apart from :class:`~dspark_jax.config.TargetConfig` because Gemma4 layers are heterogeneous: sliding and
full attention layers differ in head dim, KV heads and RoPE, and its blocks carry extras (per-layer input
embeddings, an MoE branch beside the dense MLP) that Qwen3 configs have no words for.

Both spellings transformers uses are read: the released one (``global_head_dim`` /
``num_global_key_value_heads``) and the one transformers >= 5.2x writes back (``per_layer_config``). We
write the released spelling, which every transformers version with Gemma4 reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dspark_jax.config import ConfigError, HFConfig, RopeConfig, check_positive_ints, jsonable_ids, token_ids

GEMMA4_TYPES = ("gemma4_text", "gemma4")
LAYER_TYPES = ("sliding_attention", "full_attention")
_GEMMA4_ROPE_TYPES = ("default", "proportional")


def _default_layer_types(n: int) -> tuple[str, ...]:
    # transformers' default: five sliding layers then one full layer, and the last layer is always full
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if types:
        types[-1] = "full_attention"
    return tuple(types)


def _rope(params: Mapping[str, Any] | None, default: Mapping[str, Any], where: str) -> RopeConfig:
    params = dict(default if params is None else params)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0)
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unsupported rope parameter(s) {unknown}")
    rope = RopeConfig(**params)
    if rope.rope_type not in _GEMMA4_ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type={rope.rope_type!r} is not supported for Gemma4 "
                          f"(supported: {_GEMMA4_ROPE_TYPES})")
    return rope


_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclasses.dataclass(frozen=True)
class Gemma4Config(HFConfig):
    """Gemma4 text decoder (``Gemma4ForCausalLM``). Field names follow transformers' ``Gemma4TextConfig``.

    Sliding layers use ``head_dim`` / ``num_key_value_heads`` / ``rope_sliding``; full layers use
    ``global_head_dim``, ``num_global_key_value_heads`` when ``attention_k_eq_v`` (else ``num_key_value_heads``)
    and ``rope_full``. ``hidden_size_per_layer_input`` 0 means no per-layer input embeddings.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 512
    rope_sliding: RopeConfig = RopeConfig(**_DEFAULT_ROPE["sliding_attention"])
    rope_full: RopeConfig = RopeConfig(**_DEFAULT_ROPE["full_attention"])
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 262144
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    bos_token_id: int | tuple[int, ...] | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    dtype: str = "float32"
    model_type: str = "gemma4_text"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", _default_layer_types(self.num_hidden_layers))
        elif isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- per-layer geometry -------------------------------------------------------------
    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    def layer_head_dim(self, layer_idx: int) -> int:
        return self.head_dim if self.is_sliding(layer_idx) else self.global_head_dim

    @property
    def full_num_kv_heads(self) -> int:
        # transformers only overrides full layers' KV heads when keys double as values
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_num_kv_heads(self, layer_idx: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer_idx) else self.full_num_kv_heads

    def layer_k_eq_v(self, layer_idx: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer_idx)

    def layer_rope(self, layer_idx: int) -> RopeConfig:
        return self.rope_sliding if self.is_sliding(layer_idx) else self.rope_full

    @property
    def kv_sharing_modes(self) -> tuple[str | None, ...]:
        """Per layer: None, "store" (its K/V are reused later) or "reuse" (no K/V projections of its own: it
        attends with the K/V of the last earlier non-shared layer of its type), as transformers assigns them."""
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        if not shared:
            return (None,) * n
        first = n - shared
        modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
        for kind in set(self.layer_types):
            producers = [i for i in range(first) if self.layer_types[i] == kind]
            if producers:
                modes[producers[-1]] = "store"
        return tuple(modes)

    def kv_source(self, layer_idx: int) -> int:
        """The layer whose K/V (and cache) ``layer_idx`` attends with: itself unless it is a "reuse" layer."""
        if self.kv_sharing_modes[layer_idx] != "reuse":
            return layer_idx
        first = self.num_hidden_layers - self.num_kv_shared_layers
        kind = self.layer_types[layer_idx]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def layer_intermediate_size(self, layer_idx: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_sharing_modes[layer_idx] == "reuse"
        return self.intermediate_size * (2 if wide else 1)

    # ---- checks --------------------------------------------------------------------------
    def validate(self, where: str = "Gemma4Config") -> None:
        if self.model_type not in GEMMA4_TYPES:
            raise ConfigError(f"{where}: model_type={self.model_type!r} is not a Gemma4 type {GEMMA4_TYPES}")
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
                                   "sliding_window"), where)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{where}: layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ConfigError(f"{where}: layer_types {bad} are not among {LAYER_TYPES}")
        for i in range(self.num_hidden_layers):
            nkv = self.layer_num_kv_heads(i)
            if self.num_attention_heads % nkv:
                raise ConfigError(f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                                  f"layer {i}'s {nkv} KV heads")
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ConfigError(f"{where}: head dims must be even for RoPE")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{where}: hidden_activation={self.hidden_activation!r} is not supported "
                              "(only 'gelu_pytorch_tanh')")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ConfigError(f"{where}: final_logit_softcapping must be > 0 or null")
        if self.enable_moe_block:
            if self.num_experts <= 0 or not 0 < self.top_k_experts <= self.num_experts:
                raise ConfigError(f"{where}: enable_moe_block needs num_experts > 0 and top_k_experts in "
                                  f"[1, num_experts], got {self.num_experts} / {self.top_k_experts}")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{where}: enable_moe_block needs moe_intermediate_size > 0")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(f"{where}: num_kv_shared_layers={self.num_kv_shared_layers} must be in "
                              f"[0, num_hidden_layers={self.num_hidden_layers})")
        first = self.num_hidden_layers - self.num_kv_shared_layers
        if self.num_kv_shared_layers and set(self.layer_types[:first]) != set(self.layer_types):
            raise ConfigError(f"{where}: every layer type that shares K/V needs an earlier non-shared layer of that "
                              f"type (layer_types {list(self.layer_types)}, {self.num_kv_shared_layers} shared)")
        if self.hidden_size_per_layer_input < 0:
            raise ConfigError(f"{where}: hidden_size_per_layer_input must be >= 0")

    # ---- HF conversion -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "Gemma4Config":
        """Reads a ``gemma4_text`` config, or the ``text_config`` of a multimodal ``gemma4`` one."""
        d = dict(d)
        if d.get("model_type") == "gemma4":
            if not isinstance(d.get("text_config"), Mapping):
                raise ConfigError(f"{where}: a 'gemma4' config needs a 'text_config' object")
            outer = d
            d = dict(d["text_config"])
            for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dtype", "torch_dtype"):
                if k not in d and k in outer:
                    d[k] = outer[k]
        elif d.get("model_type") != "gemma4_text":
            raise ConfigError(f"{where}: model_type={d.get('model_type')!r} is not a Gemma4 type {GEMMA4_TYPES}")
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{where}: use_bidirectional_attention={d['use_bidirectional_attention']!r} is not "
                              "supported (causal text decoding only)")

        def req(name):
            if d.get(name) is None:
                raise ConfigError(f"{where}: missing field {name!r}")
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{where}: {name} must be an integer, got {v!r}")
            return v

        n_layers = req("num_hidden_layers")
        layer_types = tuple(d.get("layer_types") or _default_layer_types(n_layers))
        if layer_types and layer_types[-1] != "full_attention":  # transformers forces this too
            layer_types = layer_types[:-1] + ("full_attention",)
        k_eq_v = bool(d.get("attention_k_eq_v", False))
        global_hd = d.get("global_head_dim")
        global_kv = d.get("num_global_key_value_heads")
        per_layer = d.get("per_layer_config")
        if isinstance(per_layer, Mapping) and per_layer:
            # transformers writes entries for full layers only; a draft's copied config may still list the
            # target's layer indices, so entries are not checked against this config's layer_types
            full = [dict(v) for v in per_layer.values() if isinstance(v, Mapping)]
            hds = {o.get("head_dim") for o in full}
            kvs = {o.get("num_key_value_heads") for o in full}
            if len(hds) > 1 or len(kvs) > 1:
                raise ConfigError(f"{where}: per_layer_config gives full layers different geometries {per_layer}")
            global_hd = global_hd if not full or full[0].get("head_dim") is None else full[0]["head_dim"]
            if full and full[0].get("num_key_value_heads") is not None:
                global_kv = full[0]["num_key_value_heads"]
        rope = d.get("rope_parameters") or _DEFAULT_ROPE
        if not isinstance(rope, Mapping) or not set(rope) <= set(LAYER_TYPES):
            raise ConfigError(f"{where}: rope_parameters must map layer types {LAYER_TYPES} to RoPE parameters")
        eos = d.get("eos_token_id", 1)
        kw = dict(
            vocab_size=req("vocab_size"), hidden_size=req("hidden_size"), intermediate_size=req("intermediate_size"),
            num_hidden_layers=n_layers, num_attention_heads=req("num_attention_heads"),
            num_key_value_heads=req("num_key_value_heads"), head_dim=int(d.get("head_dim") or 256),
            global_head_dim=int(global_hd or 512),
            num_global_key_value_heads=None if global_kv is None else int(global_kv),
            attention_k_eq_v=k_eq_v, layer_types=layer_types, sliding_window=int(d.get("sliding_window") or 512),
            rope_sliding=_rope(rope.get("sliding_attention"), _DEFAULT_ROPE["sliding_attention"], where),
            rope_full=_rope(rope.get("full_attention"), _DEFAULT_ROPE["full_attention"], where),
            final_logit_softcapping=None if d.get("final_logit_softcapping") is None
            else float(d["final_logit_softcapping"]),
            hidden_activation=d.get("hidden_activation") or "gelu_pytorch_tanh",
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=bool(d.get("attention_bias", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            hidden_size_per_layer_input=int(d.get("hidden_size_per_layer_input") or 0),
            vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or 262144),
            enable_moe_block=bool(d.get("enable_moe_block", False)),
            num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
            use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
            bos_token_id=token_ids(d.get("bos_token_id", 2)), eos_token_id=token_ids(eos),
            pad_token_id=d.get("pad_token_id", 0),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )
        if kw["enable_moe_block"]:
            kw.update(num_experts=int(d.get("num_experts") or 0), top_k_experts=int(d.get("top_k_experts") or 0),
                      moe_intermediate_size=int(d.get("moe_intermediate_size") or 0))
        return cls._from_fields(kw, where)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``gemma4_text`` / ``Gemma4ForCausalLM`` config.json."""
        d: dict[str, Any] = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "attention_k_eq_v": self.attention_k_eq_v,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {"sliding_attention": self.rope_sliding.to_hf(),
                                "full_attention": self.rope_full.to_hf()},
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_activation": self.hidden_activation,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "enable_moe_block": self.enable_moe_block,
            "num_experts": self.num_experts or None,
            "top_k_experts": self.top_k_experts or None,
            "moe_intermediate_size": self.moe_intermediate_size or None,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "use_bidirectional_attention": None,
            "use_cache": True,
            "bos_token_id": jsonable_ids(self.bos_token_id),
            "eos_token_id": jsonable_ids(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        return d

    def replace(self, **changes) -> "Gemma4Config":
        return dataclasses.replace(self, **changes)


