"""DeepSpec ``Gemma4DSparkModel`` / ``Gemma4Eagle3Model`` draft checkpoints <-> nnx Gemma4 drafts (spec §2, names
as §1.9 / §5).

``config.json`` is the target's text config (``model_type`` gemma4_text) with DeepSpec's overrides and DSpark keys;
tensors have no ``model.`` prefix. Beside the Qwen3 draft's keys a layer holds ``pre_feedforward_layernorm``,
``post_feedforward_layernorm`` and ``layer_scalar`` [1], and no ``self_attn.v_proj`` under ``attention_k_eq_v``
(``v_norm`` has no weight). Keys the target config carries that the draft does not model (including its MoE /
per-layer-input fields, which the draft ignores) are written back verbatim.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.convert.gemma4 import CHOICES  # noqa: F401  (registers the g4_* template names)
from dspark_jax.convert.keymap import dtype_name, export_tensors, fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import DEEPSPEC_DSPARK_RULES, KeyRule
from dspark_jax.convert.safetensors_io import checkpoint_files, save_shards
from dspark_jax.drafts.config import (ANCHOR_FIRST, GEMMA4_ARCHITECTURES, GEMMA4_DSPARK_ARCH, GEMMA4_EAGLE3_ARCH,
                                      DraftConfig)
from dspark_jax.targets.gemma4_config import Gemma4Config

GEMMA4_DRAFT_RULES: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "embed_tokens"),
    KeyRule("lm_head.weight", "lm_head"),
    KeyRule("fc.weight", "fc.kernel", "transpose"),
    KeyRule("hidden_norm.weight", "hidden_norm.weight"),
    KeyRule("norm.weight", "norm.weight"),
    KeyRule("layers.{layer}.{g4_norm}.weight", "layers.{layer}.{g4_norm}.weight"),
    KeyRule("layers.{layer}.layer_scalar", "layers.{layer}.layer_scalar"),
    KeyRule("layers.{layer}.self_attn.{attn_proj}.weight", "layers.{layer}.self_attn.{attn_proj}.kernel", "transpose"),
    KeyRule("layers.{layer}.self_attn.{attn_proj}.bias", "layers.{layer}.self_attn.{attn_proj}.bias"),
    KeyRule("layers.{layer}.self_attn.{qk_norm}.weight", "layers.{layer}.self_attn.{qk_norm}.weight"),
    KeyRule("layers.{layer}.mlp.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}.kernel", "transpose"),
    # the heads are the Qwen3 draft's
    *(r for r in DEEPSPEC_DSPARK_RULES if r.torch.startswith(("markov_head.", "confidence_head."))),
)
# Gemma4Eagle3Model: one Eagle3 layer per draft layer (hidden_norm on the fed-back state), no heads
GEMMA4_EAGLE3_RULES: tuple[KeyRule, ...] = tuple(
    r for r in GEMMA4_DRAFT_RULES if not r.torch.startswith(("markov_head.", "confidence_head.", "hidden_norm."))
) + (KeyRule("layers.{layer}.hidden_norm.weight", "layers.{layer}.hidden_norm.weight"),)
GEMMA4_DRAFT_IGNORED = (re.compile(r".*rotary_emb\..*inv_freq$"), re.compile(r".*embed_scale$"))

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


def gemma4_draft_class(config: DraftConfig):
    """(draft class, key table) of a Gemma4 draft config."""
    from dspark_jax.drafts.gemma4 import Gemma4DSparkDraft, Gemma4Eagle3Draft

    return (Gemma4Eagle3Draft, GEMMA4_EAGLE3_RULES) if config.is_eagle3 else (Gemma4DSparkDraft, GEMMA4_DRAFT_RULES)


def gemma4_draft_config_from_hf(d: Mapping[str, Any], where: str = "config.json") -> DraftConfig:
    """A ``Gemma4DSparkModel`` / ``Gemma4Eagle3Model`` config.json -> bound :class:`DraftConfig` (``arch`` a
    Gemma4Config)."""
    d = dict(d)
    if d["architectures"][0] == GEMMA4_EAGLE3_ARCH:
        return _eagle3_config_from_hf(d, where)
    for k in ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank"):
        if k not in d:
            raise ConfigError(f"{where}: missing field {k!r} (required by {GEMMA4_DSPARK_ARCH})")
    arch = _arch_from_hf(d, where)
    extra = {k: v for k, v in d.items() if k not in _MODELED and k not in _DSPARK_KEYS}
    try:
        return DraftConfig(
            architecture=GEMMA4_DSPARK_ARCH, target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
            num_target_layers=d.get("num_target_layers"), arch=arch, num_draft_layers=arch.num_hidden_layers,
            extra_json=json.dumps(extra, sort_keys=True), dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            block_size=int(d.get("block_size", 7)), mask_token_id=int(d["mask_token_id"]),
            num_anchors=int(d["num_anchors"]), enable_confidence_head=bool(d["enable_confidence_head"]),
            confidence_head_with_markov=bool(d.get("confidence_head_with_markov", True)),
            markov_rank=int(d["markov_rank"]), markov_head_type=str(d.get("markov_head_type", "vanilla")))
    except ConfigError as e:
        raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None


def _arch_from_hf(d: dict, where: str) -> Gemma4Config:
    from dspark_jax.drafts.gemma4 import gemma4_draft_arch

    arch_dict = {k: v for k, v in d.items() if k not in _TARGET_ONLY}
    arch_dict["model_type"] = "gemma4_text"
    arch = Gemma4Config.from_hf_dict(arch_dict, where=where)
    return gemma4_draft_arch(arch, arch.num_hidden_layers)


def _eagle3_config_from_hf(d: dict, where: str) -> DraftConfig:
    if "target_layer_ids" not in d:
        raise ConfigError(f"{where}: missing field 'target_layer_ids' (required by {GEMMA4_EAGLE3_ARCH})")
    arch = _arch_from_hf(d, where)
    extra = {k: v for k, v in d.items() if k not in _MODELED and k not in _EAGLE3_KEYS}
    try:
        return DraftConfig(
            architecture=GEMMA4_EAGLE3_ARCH, target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
            num_target_layers=d.get("num_target_layers"), arch=arch, num_draft_layers=arch.num_hidden_layers,
            extra_json=json.dumps(extra, sort_keys=True), dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            ttt_length=int(d.get("ttt_length", 7)), step_loss_decay=float(d.get("step_loss_decay", 0.8)),
            target_model_name_or_path=d.get("target_model_name_or_path"), markov_rank=0,
            enable_confidence_head=False)
    except ConfigError as e:
        raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None


def gemma4_draft_config_to_hf(cfg: DraftConfig) -> dict[str, Any]:
    """The config.json DeepSpec writes for a Gemma4 DSpark / DFlash draft."""
    if not isinstance(cfg.arch, Gemma4Config):
        raise ConfigError("a Gemma4 draft config needs arch to be a Gemma4Config (bind it to a Gemma4 target)")
    if cfg.slot_convention != ANCHOR_FIRST or cfg.draft_vocab is not None:
        raise ConfigError("a Gemma4DSparkModel config.json holds anchor-first, full-vocab drafts only")
    d = cfg.arch.to_hf_dict()
    # DeepSpec records where the copied text config came from (a loaded file's own values win below)
    d.update(target_model_type="gemma4", target_text_model_type="gemma4_text")
    d.update(json.loads(cfg.extra_json))
    d.update(architectures=[cfg.architecture], model_type="gemma4_text", num_hidden_layers=cfg.num_draft_layers,
             layer_types=["full_attention"] * cfg.num_draft_layers, tie_word_embeddings=False, dtype=cfg.dtype,
             target_layer_ids=list(cfg.target_layer_ids))
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    if cfg.is_eagle3:
        d.update(ttt_length=cfg.ttt_length, step_loss_decay=cfg.step_loss_decay,
                 draft_num_hidden_layers=cfg.num_draft_layers)
        if cfg.target_model_name_or_path is not None:
            d["target_model_name_or_path"] = cfg.target_model_name_or_path
        return d
    d.update(block_size=cfg.block_size,
             mask_token_id=cfg.mask_token_id, num_anchors=cfg.num_anchors,
             enable_confidence_head=cfg.enable_confidence_head, markov_rank=cfg.markov_rank)
    if cfg.enable_confidence_head:
        d["confidence_head_with_markov"] = cfg.confidence_head_with_markov
    if cfg.markov_rank:
        d["markov_head_type"] = cfg.markov_head_type
    return d


def load_gemma4_draft(path: str | os.PathLike, dtype=None, *, sharding=None, attention_impl: str = "auto"):
    """Loads a DeepSpec ``Gemma4DSparkModel`` directory (strict: every key and shape checked)."""
    d, where = read_config_json(path)
    cfg = gemma4_draft_config_from_hf(d, where)
    cls, rules = gemma4_draft_class(cfg)
    dt = resolve_dtype(dtype if dtype is not None else cfg.dtype)
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dt, attention_impl=attention_impl))
    graphdef, abs_state = nnx.split(abstract)
    values = read_state(abs_state, checkpoint_files(os.fspath(path)), rules, GEMMA4_DRAFT_IGNORED, dt,
                        sharding, strip_prefix="_orig_mod.")
    draft = nnx.merge(graphdef, fill_state(abs_state, values))
    from dspark_jax.decode.calibrate import attach_saved_temperatures

    return attach_saved_temperatures(draft, os.fspath(path))


def gemma4_draft_tensors(draft) -> dict[str, np.ndarray]:
    return export_tensors(nnx.state(draft, nnx.Variable), gemma4_draft_class(draft.config)[1])


def save_gemma4_draft(draft, path: str | os.PathLike, *, max_shard_bytes: int = 50 * 2**30, dtype=None) -> str:
    """Writes ``config.json`` + ``model.safetensors`` with DeepSpec's Gemma4 key set (see module doc)."""
    path = os.fspath(path)
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else draft.dtype))
    cfg = gemma4_draft_config_to_hf(draft.config)
    tensors = {k: (v if v.dtype == out_dtype else v.astype(out_dtype)) for k, v in gemma4_draft_tensors(draft).items()}
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    cfg["dtype"] = dtype_name(out_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:
        from dspark_jax.decode.calibrate import save_temperatures

        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path
