"""Frozen configuration dataclasses, read from and written to Hugging Face ``config.json`` files.

A config that is inconsistent (heads that do not divide, a tap beyond the last layer, an unknown
``model_type``) raises :class:`ConfigError` naming the offending field, before any array is made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_TARGET_TYPES = ("qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


class ConfigError(ValueError):
    """A configuration is malformed; the message names the field (and the file when known)."""


def read_config_json(path: str | os.PathLike) -> tuple[dict, str]:
    """Reads ``config.json`` (``path`` may be its directory) -> (dict, file path), with errors naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d, path


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters in transformers' ``rope_parameters`` vocabulary.

    ``rope_type`` "default" is plain RoPE; "linear" divides positions by ``factor``; "yarn" and
    "llama3" rescale frequencies (Qwen3's long-context setting is yarn).
    """

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    partial_rotary_factor: float = 1.0

    def to_hf(self) -> dict[str, Any]:
        out = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        for f in dataclasses.fields(self):
            if f.name in out:
                continue
            v = getattr(self, f.name)
            if v is not None and not (f.name == "partial_rotary_factor" and v == 1.0):
                out[f.name] = v
        return out


def _rope_from_hf(d: Mapping[str, Any], where: str) -> RopeConfig:
    """Reads both the transformers>=5 ``rope_parameters`` form and the older ``rope_theta`` +
    ``rope_scaling`` form."""
    params: dict[str, Any] = {}
    if isinstance(d.get("rope_parameters"), Mapping):
        params.update(d["rope_parameters"])
    scaling = d.get("rope_scaling")
    if isinstance(scaling, Mapping):
        params.update(scaling)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if "rope_theta" not in params:
        params["rope_theta"] = d.get("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    if "partial_rotary_factor" in d and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = d["partial_rotary_factor"]
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unsupported rope parameter(s) {unknown}")
    rope = RopeConfig(**params)
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope_type={rope.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if rope.rope_type in ("linear", "llama3") and rope.factor is None:
        raise ConfigError(f"{where}: rope_type={rope.rope_type!r} needs rope 'factor'")
    if rope.rope_type in ("yarn", "llama3") and rope.original_max_position_embeddings is None:
        raise ConfigError(f"{where}: rope_type={rope.rope_type!r} needs 'original_max_position_embeddings'")
    return rope


class HFConfig:
    """What every target family's config shares: ``eos_token_ids`` (its ``eos_token_id`` is an id, several ids or
    None), ``from_json`` over its own ``from_hf_dict``, and construction whose errors name the file."""

    eos_token_id: int | tuple[int, ...] | None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return (e,) if isinstance(e, int) else tuple(e)

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        d, where = read_config_json(path)
        return cls.from_hf_dict(d, where=where)

    @classmethod
    def _from_fields(cls, kwargs: Mapping[str, Any], where: str):
        """``cls(**kwargs)`` with a ConfigError's ``ClassName:`` prefix replaced by ``where`` (the file)."""
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(str(e).replace(cls.__name__, where, 1)) from None


@dataclasses.dataclass(frozen=True)
class TargetConfig(HFConfig):
    """Architecture of a target model (Qwen3 dense or Qwen3-MoE).

    Field names follow transformers; :meth:`from_hf_dict` / :meth:`to_hf_dict` convert.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # MoE (qwen3_moe); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Special tokens (metadata; kept so save_target writes them back).
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as transformers' Qwen3MoeDecoderLayer."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    # ---- checks --------------------------------------------------------------------------
    def validate(self, where: str = "TargetConfig") -> None:
        if self.model_type not in SUPPORTED_TARGET_TYPES:
            raise ConfigError(
                f"{where}: model_type={self.model_type!r} is not supported (supported: {SUPPORTED_TARGET_TYPES})"
            )
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim"), where)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}: hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{where}: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.num_experts < 0:
            raise ConfigError(f"{where}: num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts > 0:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"{where}: num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                    f"{self.num_experts}]"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{where}: moe_intermediate_size must be > 0 for an MoE model")
            if self.decoder_sparse_step <= 0:
                raise ConfigError(f"{where}: decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"{where}: mlp_only_layers has ids outside [0, {self.num_hidden_layers}): {bad}")
        if self.model_type == "qwen3_moe" and self.num_experts == 0:
            raise ConfigError(f"{where}: model_type 'qwen3_moe' needs num_experts > 0")
        if self.model_type == "qwen3" and self.num_experts:
            raise ConfigError(f"{where}: model_type 'qwen3' is dense but num_experts={self.num_experts}")
        if self.rope.partial_rotary_factor != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported for Qwen3")

    # ---- HF conversion -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "TargetConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError(f"{where}: missing field 'model_type'")
        if model_type not in SUPPORTED_TARGET_TYPES:
            raise ConfigError(
                f"{where}: model_type={model_type!r} is not supported (supported: {SUPPORTED_TARGET_TYPES})"
            )
        if d.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")

        def req(name):
            if name not in d or d[name] is None:
                raise ConfigError(f"{where}: missing field {name!r}")
            return d[name]

        def integer(name, value):
            # int(value) would truncate 32.5 silently and fail on "big" without naming the field
            if isinstance(value, bool) or not (isinstance(value, int) or
                                               (isinstance(value, float) and value.is_integer())):
                raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
            return int(value)

        def req_int(name):
            return integer(name, req(name))

        def opt_int(name, default):
            return default if d.get(name) is None else integer(name, d[name])

        hidden = req_int("hidden_size")
        heads = req_int("num_attention_heads")
        head_dim = opt_int("head_dim", None)
        if head_dim is None:
            if heads <= 0:
                raise ConfigError(f"{where}: num_attention_heads must be a positive integer, got {heads}")
            if hidden % heads:
                raise ConfigError(f"{where}: no head_dim and hidden_size={hidden} not divisible by heads={heads}")
            head_dim = hidden // heads
        num_experts = opt_int("num_experts", None)
        if num_experts is None:
            num_experts = opt_int("num_local_experts", 0)
        if model_type == "qwen3":
            num_experts = 0
        kwargs = dict(
            model_type=model_type,
            vocab_size=req_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req_int("intermediate_size"),
            num_hidden_layers=req_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=opt_int("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d, where),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=token_ids(d.get("bos_token_id")),
            eos_token_id=token_ids(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )
        if num_experts:
            kwargs.update(
                num_experts=num_experts,
                num_experts_per_tok=req_int("num_experts_per_tok"),
                moe_intermediate_size=req_int("moe_intermediate_size"),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=opt_int("decoder_sparse_step", 1),
                mlp_only_layers=tuple(integer("mlp_only_layers", i) for i in (d.get("mlp_only_layers") or ())),
                router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            )
        return cls._from_fields(kwargs, where)

    def to_hf_dict(self) -> dict[str, Any]:
        arch = "Qwen3MoeForCausalLM" if self.model_type == "qwen3_moe" else "Qwen3ForCausalLM"
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            # older transformers read these two; newer ones read rope_parameters
            "rope_theta": self.rope.rope_theta,
            "rope_scaling": None if self.rope.rope_type == "default" else self.rope.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "sliding_window": None,
            "use_cache": True,
            "bos_token_id": jsonable_ids(self.bos_token_id),
            "eos_token_id": jsonable_ids(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        if self.num_experts:
            d.update(
                num_experts=self.num_experts,
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
            )
        return d

    def replace(self, **changes) -> "TargetConfig":
        return dataclasses.replace(self, **changes)


def token_ids(v):
    """A ``config.json`` token-id field (an id, a list of ids or null) as the configs hold it (lists -> tuples)."""
    if isinstance(v, list):
        return tuple(int(i) for i in v)
    return v


def jsonable_ids(v):
    return list(v) if isinstance(v, tuple) else v


def check_positive_ints(config, names, where: str) -> None:
    """A ConfigError naming the first of ``names`` that is not a positive integer on ``config``."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{where}: {name} must be a positive integer, got {v!r}")


def tiny_qwen3_config(**overrides) -> TargetConfig:
    """A small dense Qwen3 config for demos and tests."""
    base = dict(
        model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope=RopeConfig(rope_theta=1e6),
        max_position_embeddings=4096,
    )
    base.update(overrides)
    return TargetConfig(**base)


def next_bucket(n: int, minimum: int = 16) -> int:
    """Rounds a length up to a power of two (at least ``minimum``), so jitted shapes repeat."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
