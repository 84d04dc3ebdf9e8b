"""DeepSpec's ``Gemma4DSparkModel`` / ``Gemma4Eagle3Model`` ``config.json`` <-> :class:`DraftConfig` (``arch`` a
:class:`~dspark_jax.targets.gemma4_config.Gemma4Config`): the target's text config with DeepSpec's overrides and
DSpark keys; keys the draft does not model are kept verbatim in ``extra_json`` and written back."""

from __future__ import annotations

import json
from typing import Any, Mapping

from dspark_jax.config import ConfigError
from dspark_jax.targets.gemma4_config import Gemma4Config

# DeepSpec names the Gemma4 drafts apart (same DSpark / DFlash / Eagle3 semantics; arch is a Gemma4Config)
GEMMA4_DSPARK_ARCH = "Gemma4DSparkModel"
GEMMA4_EAGLE3_ARCH = "Gemma4Eagle3Model"
GEMMA4_ARCHITECTURES = (GEMMA4_DSPARK_ARCH, GEMMA4_EAGLE3_ARCH)

_EAGLE3_KEYS = ("target_layer_ids", "num_target_layers", "ttt_length", "step_loss_decay", "draft_num_hidden_layers",
                "target_model_name_or_path")
_DSPARK_KEYS = ("block_size", "mask_token_id", "target_layer_ids", "num_anchors", "num_target_layers",
                "enable_confidence_head", "confidence_head_with_markov", "markov_rank", "markov_head_type")
# target-only fields the draft arch turns off; their file values are kept in extra_json and written back
_TARGET_ONLY = ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
                "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
                "use_double_wide_mlp")
_MODELED = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
            "attention_k_eq_v", "layer_types", "sliding_window", "rope_parameters", "final_logit_softcapping",
            "hidden_activation", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
            "per_layer_config", "use_bidirectional_attention", "attention_dropout", "use_cache",
            "transformers_version"}


def is_gemma4_draft_json(d: Mapping[str, Any]) -> bool:
    return (d.get("architectures") or [None])[0] in GEMMA4_ARCHITECTURES


def gemma4_draft_arch(target: Gemma4Config, num_layers: int) -> Gemma4Config:
    """The draft's architecture: DeepSpec's deep copy of the target text config with its overrides."""
    return target.replace(num_hidden_layers=num_layers, layer_types=("full_attention",) * num_layers,
                          tie_word_embeddings=False, enable_moe_block=False, num_experts=0, top_k_experts=0,
                          moe_intermediate_size=0, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                          model_type="gemma4_text")


def gemma4_draft_fields_from_hf(d: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """A ``Gemma4DSparkModel`` / ``Gemma4Eagle3Model`` config.json -> the fields of a bound
    :class:`~dspark_jax.drafts.config.DraftConfig` (``arch`` a Gemma4Config); ``DraftConfig.from_hf_dict`` builds
    it."""
    d = dict(d)
    if d["architectures"][0] == GEMMA4_EAGLE3_ARCH:
        return _eagle3_fields_from_hf(d, where)
    for k in ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank"):
        if k not in d:
            raise ConfigError(f"{where}: missing field {k!r} (required by {GEMMA4_DSPARK_ARCH})")
    arch = _arch_from_hf(d, where)
    extra = {k: v for k, v in d.items() if k not in _MODELED and k not in _DSPARK_KEYS}
    return dict(
        architecture=GEMMA4_DSPARK_ARCH, target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
        num_target_layers=d.get("num_target_layers"), arch=arch, num_draft_layers=arch.num_hidden_layers,
        extra_json=json.dumps(extra, sort_keys=True), dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        block_size=int(d.get("block_size", 7)), mask_token_id=int(d["mask_token_id"]),
        num_anchors=int(d["num_anchors"]), enable_confidence_head=bool(d["enable_confidence_head"]),
        confidence_head_with_markov=bool(d.get("confidence_head_with_markov", True)),
        markov_rank=int(d["markov_rank"]), markov_head_type=str(d.get("markov_head_type", "vanilla")))


def _arch_from_hf(d: dict, where: str) -> Gemma4Config:
    arch_dict = {k: v for k, v in d.items() if k not in _TARGET_ONLY}
    arch_dict["model_type"] = "gemma4_text"
    arch = Gemma4Config.from_hf_dict(arch_dict, where=where)
    return gemma4_draft_arch(arch, arch.num_hidden_layers)


def _eagle3_fields_from_hf(d: dict, where: str) -> dict[str, Any]:
    if "target_layer_ids" not in d:
        raise ConfigError(f"{where}: missing field 'target_layer_ids' (required by {GEMMA4_EAGLE3_ARCH})")
    arch = _arch_from_hf(d, where)
    extra = {k: v for k, v in d.items() if k not in _MODELED and k not in _EAGLE3_KEYS}
    return dict(
        architecture=GEMMA4_EAGLE3_ARCH, target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
        num_target_layers=d.get("num_target_layers"), arch=arch, num_draft_layers=arch.num_hidden_layers,
        extra_json=json.dumps(extra, sort_keys=True), dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        ttt_length=int(d.get("ttt_length", 7)), step_loss_decay=float(d.get("step_loss_decay", 0.8)),
        target_model_name_or_path=d.get("target_model_name_or_path"), markov_rank=0,
        enable_confidence_head=False)


def gemma4_draft_config_to_hf(cfg) -> dict[str, Any]:
    """The config.json DeepSpec writes for a Gemma4 draft (``cfg`` a bound DraftConfig whose ``to_hf_dict``
    checked it is anchor-first and full-vocab)."""
    if not isinstance(cfg.arch, Gemma4Config):
        raise ConfigError("a Gemma4 draft config needs arch to be a Gemma4Config (bind it to a Gemma4 target)")
    d = cfg.arch.to_hf_dict()
    # DeepSpec records where the copied text config came from (a loaded file's own values win below)
    d.update(target_model_type="gemma4", target_text_model_type="gemma4_text")
    d.update(json.loads(cfg.extra_json))
    d.update(architectures=[cfg.architecture], model_type="gemma4_text", num_hidden_layers=cfg.num_draft_layers,
             layer_types=["full_attention"] * cfg.num_draft_layers, tie_word_embeddings=False, dtype=cfg.dtype,
             target_layer_ids=list(cfg.target_layer_ids))
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    d.update(cfg.family_fields())    # anchor-first, full vocab (checked above): Gemma4 and Qwen3 drafts agree
    return d
