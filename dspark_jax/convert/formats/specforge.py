"""SpecForge's layouts: ``DSparkDraftModel`` (a Qwen3 backbone config with ``dflash_config``, anchor-first, no
embedding / LM head stored; DRAFT_FORMATS §2.5), its DFlash export (the z-lab layout, zlab.py), and the Llama
Eagle3 ``LlamaForCausalLMEagle3`` (§2.4: ``midlayer.*``, 3 taps, a trained pruned LM head with ``d2t``/``t2d``)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from dspark_jax.config import ConfigError
from dspark_jax.convert.families import BLOCK, EAGLE3, draft_family
from dspark_jax.convert.formats.common import (
    DEFAULT_EAGLE3_TOKENS,
    DEFAULT_NUM_ANCHORS,
    MARKOV_KEYS,
    DraftCheckpoint,
    DraftFormat,
    ExportOptions,
    FormatError,
    Lazy,
    arch_config,
    backbone_dict,
    bool_field,
    check_tensors,
    deepspec_tensors,
    file_listing,
    finish_shared,
    handle_lazy,
    ids_field,
    llama_backbone,
    make_config,
    out_dtype,
    read_vocab_tables,
    refuse,
    scatter,
    vocab_tables,
    write_dir,
)
from dspark_jax.convert.formats.zlab import NO_VOCAB_TABLES, plan_bonus_anchor, write_shared, zlab_config
from dspark_jax.convert.safetensors_io import CheckpointError
from dspark_jax.drafts.config import (
    ANCHOR_FIRST,
    BONUS_ANCHOR,
    DSPARK_ARCH,
    EAGLE3_ARCH,
    EAGLE3_LLAMA,
    LAYER_OUTPUT,
    DraftConfig,
    specforge_eagle3_layer_ids,
)
from dspark_jax.targets.registry import target_config_from_json

NAME = "specforge"
SPECFORGE_DSPARK_ARCH = "DSparkDraftModel"
SPECFORGE_EAGLE3_ARCH = "LlamaForCausalLMEagle3"
SPECFORGE_EAGLE3_TAPS = 3           # LlamaForCausalLMEagle3 builds fc as [H, 3 * H_target]
SPECFORGE_EAGLE3_LAYER_FIELD = "eagle_config.eagle_aux_hidden_state_layer_ids"


def detect(d: Mapping[str, Any], where: str) -> bool:
    arch = (d.get("architectures") or [None])[0]
    if arch == SPECFORGE_EAGLE3_ARCH:
        return True
    dflash_config = d.get("dflash_config")
    if not isinstance(dflash_config, dict):
        return False
    return (arch == SPECFORGE_DSPARK_ARCH or dflash_config.get("projector_type") == "dspark"
            or (arch == DSPARK_ARCH and "target_layer_ids" not in d))


# ---- reading -----------------------------------------------------------------------------------------------

def _read_dspark(path, d, where, raw, target=None) -> DraftCheckpoint:
    dc = d["dflash_config"]
    proj = dc.get("projector_type", "dspark")
    if proj != "dspark":
        raise FormatError(f"{where}: dflash_config.projector_type={proj!r}; a SpecForge DSpark export has 'dspark'")

    def field(k, default=None):
        # the SGLang-normalised export hoists the Markov keys to the top level (DRAFT_FORMATS §2.5)
        return dc[k] if k in dc else d.get(k, default)

    for k in ("mask_token_id", "target_layer_ids"):
        if field(k) is None:
            raise ConfigError(f"{where}: missing field dflash_config.{k}")
    if "block_size" not in d and "block_size" not in dc:
        raise ConfigError(f"{where}: missing field 'block_size'")
    arch, extra = arch_config(d, where, {"dflash_config", "block_size", "num_target_layers", "architectures",
                                         "auto_map", *MARKOV_KEYS, "target_layer_ids", "mask_token_id"})
    ids = ids_field(field("target_layer_ids"), "dflash_config.target_layer_ids", where)
    rank = int(field("markov_rank", 0))
    alpha = field("confidence_head_alpha")
    # SpecForge turns the head on when its loss weight is positive, unless the flag says otherwise
    conf = field("enable_confidence_head", bool(alpha is not None and alpha > 0))
    if not isinstance(conf, bool):
        raise ConfigError(f"{where}: dflash_config.enable_confidence_head must be true or false, got {conf!r}")
    mode = field("attention_mode")
    if mode is not None and mode != ("gqa" if arch.num_key_value_heads < arch.num_attention_heads else "mha"):
        raise ConfigError(f"{where}: dflash_config.attention_mode={mode!r} does not match num_key_value_heads="
                          f"{arch.num_key_value_heads} / num_attention_heads={arch.num_attention_heads}")
    cfg = make_config(
        where, architecture=DSPARK_ARCH, block_size=int(d.get("block_size", dc.get("block_size"))),
        mask_token_id=int(field("mask_token_id")), target_layer_ids=ids, num_anchors=DEFAULT_NUM_ANCHORS,
        num_target_layers=d.get("num_target_layers"), markov_rank=rank,
        markov_head_type=str(field("markov_head_type", "vanilla")),
        enable_confidence_head=conf,
        confidence_head_with_markov=bool(field("confidence_head_with_markov", True)),
        num_draft_layers=arch.num_hidden_layers, arch=arch, extra_json=extra,
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"), slot_convention=ANCHOR_FIRST)
    # legacy SpecForge DSpark checkpoints nest the heads under logit_head. (its loader strips it too)
    raw = {(k[len("logit_head."):] if k.startswith("logit_head.") else k): h for k, h in raw.items()}
    return finish_shared(path, NAME, d, where, raw, cfg, "dflash_config.target_layer_ids", ids, LAYER_OUTPUT)


def _target_layer_count(target) -> int | None:
    if target is None:
        return None
    if isinstance(target, (str, os.PathLike)):
        return target_config_from_json(target).num_hidden_layers
    # a family config (TargetConfig, DeepseekV3Config, ...) or a loaded target
    return getattr(target, "config", target).num_hidden_layers


def _read_eagle3(path, d, where, raw, target=None) -> DraftCheckpoint:
    """SpecForge / SGLang ``LlamaForCausalLMEagle3`` (DRAFT_FORMATS §2.4): a LlamaConfig with ``draft_vocab_size``
    and ``eagle_config.eagle_aux_hidden_state_layer_ids`` (3 ids, output convention); tensors ``midlayer.*``,
    ``fc [H, 3H]``, ``norm``, trained ``lm_head [Vd, H]``, ``d2t``/``t2d``, ``embed_tokens`` only when not frozen.

    ``target`` (a loaded target, its config, or an HF directory) supplies the tapped layers when the file leaves
    them to the target's depth."""
    field = SPECFORGE_EAGLE3_LAYER_FIELD
    mt = d.get("model_type", "llama")
    if mt != "llama":
        raise FormatError(f"{where}: a {SPECFORGE_EAGLE3_ARCH} config has model_type={mt!r}; SpecForge writes "
                          "'llama' (its draft layer is a LlamaDecoderLayer whatever the target is)")
    for k, what in (("fc_norm", "per-tap RMSNorms before fc"), ("norm_output", "a normed recurrent output")):
        if bool_field(d, k, False, where):
            raise FormatError(f"{where}: {k}=true ({what}); the Eagle3 draft here has neither (fc_norm=false, "
                              "norm_output=false)")
    for k in ("attention_bias", "mlp_bias"):
        if bool_field(d, k, False, where):
            raise FormatError(f"{where}: {k}=true, but {SPECFORGE_EAGLE3_ARCH} builds its projections without bias "
                              "whatever the config says: this config does not describe a SpecForge Eagle3 checkpoint")
    if "draft_vocab_size" not in d:
        raise ConfigError(f"{where}: missing field 'draft_vocab_size' ({SPECFORGE_EAGLE3_ARCH} sizes lm_head "
                          "[draft_vocab_size, H] from it)")
    ec = d.get("eagle_config")
    if ec is not None and not isinstance(ec, dict):
        raise ConfigError(f"{where}: eagle_config must be an object, got {ec!r}")
    notes = [f"the format stores no drafting length: {DEFAULT_EAGLE3_TOKENS} chain drafts per round (DeepSpec's "
             "ttt_length default)"]
    if not ec or ec.get("eagle_aux_hidden_state_layer_ids") is None:
        # SpecForge's released configs (e.g. configs/qwen3-4b-eagle3.json) leave the taps to the target's depth
        t = _target_layer_count(target)
        if t is None:
            raise FormatError(
                f"{where}: no {field}: SpecForge/SGLang then tap [1, T//2-1, T-4] of a T-layer target (output "
                "convention), which the file does not record; pass the target (--target DIR / target=...) or add "
                "eagle_config: {\"eagle_aux_hidden_state_layer_ids\": [...]} (e.g. [1, 17, 32] for a 36-layer "
                "target: dspark_jax.drafts.config.specforge_eagle3_layer_ids)")
        ids = specforge_eagle3_layer_ids(t)
        if not 0 <= ids[0] < ids[1] < ids[2] < t - 1:
            raise FormatError(f"{where}: no {field}, and SpecForge's default [1, T//2-1, T-4] = {list(ids)} is not a "
                              f"valid tap list for the {t}-layer target; add eagle_config with the ids it was "
                              "trained with")
        notes.append(f"no {field} in the file: SpecForge's default [1, T//2-1, T-4] = {list(ids)} for the "
                     f"{t}-layer target")
    else:
        ids = ids_field(ec["eagle_aux_hidden_state_layer_ids"], field, where)
    if len(ids) != SPECFORGE_EAGLE3_TAPS:
        raise FormatError(f"{where}: {field}={list(ids)} lists {len(ids)} layers; {SPECFORGE_EAGLE3_ARCH} fuses "
                          f"exactly {SPECFORGE_EAGLE3_TAPS} (fc is [H, 3 * H])")
    arch, extra = arch_config(d, where, {"architectures", "auto_map", "eagle_config", "draft_vocab_size",
                                         "target_hidden_size", "fc_norm", "norm_output"}, model_types=("llama",))
    if d.get("target_hidden_size") not in (None, arch.hidden_size):
        raise FormatError(f"{where}: target_hidden_size={d['target_hidden_size']} differs from the draft's "
                          f"hidden_size {arch.hidden_size}; drafts here fuse taps of the draft's own width")
    if arch.num_hidden_layers != 1:
        raise FormatError(f"{where}: num_hidden_layers={arch.num_hidden_layers}, but {SPECFORGE_EAGLE3_ARCH} has "
                          "exactly one draft layer (midlayer) whatever the config says")
    if arch.rope.rope_type not in ("default", "llama3"):
        raise FormatError(f"{where}: RoPE type {arch.rope.rope_type!r}: SpecForge's Llama Eagle3 computes its "
                          "linear / dynamic / yarn RoPE with its own code (base 10000, whatever rope_theta says), "
                          "which is not reproduced here; only default and llama3 RoPE are read")
    v = arch.vocab_size
    vd = d["draft_vocab_size"]
    if not isinstance(vd, int) or isinstance(vd, bool) or not 0 < vd <= v:
        raise ConfigError(f"{where}: draft_vocab_size={vd!r} must be an integer in [1, vocab_size={v}]")
    named = {}
    for k, h in raw.items():
        key = "layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k
        if key in named:
            raise CheckpointError(f"{where}: {key!r} is given twice (as midlayer.* and layers.0.*)")
        named[key] = h
    lm = named.get("lm_head.weight")
    if lm is None:
        raise CheckpointError(f"{where}: no lm_head.weight: a {SPECFORGE_EAGLE3_ARCH} checkpoint stores its trained "
                              "[draft_vocab_size, H] head")
    if lm.shape[0] != vd:
        raise CheckpointError(f"{where}: lm_head.weight has {lm.shape[0]} rows but draft_vocab_size={vd}")
    draft_vocab = read_vocab_tables(where, named, v, vd)
    cfg = make_config(where, architecture=EAGLE3_ARCH, eagle3_variant=EAGLE3_LLAMA, target_layer_ids=ids,
                      num_draft_layers=1, ttt_length=DEFAULT_EAGLE3_TOKENS, markov_rank=0,
                      enable_confidence_head=False, mask_token_id=0, num_anchors=DEFAULT_NUM_ANCHORS, arch=arch,
                      extra_json=extra, dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
                      draft_vocab=draft_vocab)
    check_tensors(where, cfg, named, field, ids, {"embed_tokens.weight": v})
    tensors: dict[str, Lazy] = {k: handle_lazy(h) for k, h in named.items() if k not in ("d2t", "t2d")}
    if draft_vocab is not None:
        tensors["lm_head.weight"] = scatter(tensors["lm_head.weight"], draft_vocab, v)
    shared = tuple(k for k in ("embed_tokens.weight",) if k not in tensors)
    return DraftCheckpoint(path, NAME, "eagle3", cfg, tensors, shared, file_listing(raw), field, ids,
                           LAYER_OUTPUT, notes=tuple(notes))


def read(path, d, where, raw, target=None) -> DraftCheckpoint:
    """``target`` is consulted only where a Llama Eagle3 file leaves the tapped layers to the target's depth."""
    reader = _read_eagle3 if (d.get("architectures") or [None])[0] == SPECFORGE_EAGLE3_ARCH else _read_dspark
    return reader(path, d, where, raw, target)


# ---- writing -----------------------------------------------------------------------------------------------

def _plan_block(cfg: DraftConfig, alg: str, pruned: bool) -> str:
    if pruned:
        refuse(NAME, NO_VOCAB_TABLES)
    if cfg.slot_convention == BONUS_ANCHOR:     # written as its DFlash export: the z-lab layout
        return plan_bonus_anchor(NAME, cfg, alg)
    return "dspark"


def _plan_eagle3(cfg: DraftConfig, alg: str, pruned: bool) -> str:
    if cfg.eagle3_variant != EAGLE3_LLAMA:
        refuse(NAME, "SpecForge's Eagle3 (LlamaForCausalLMEagle3) is a Llama layer without q/k norms and with "
                     f"exactly 3 taps; this is DeepSpec's Qwen3 Eagle3, whose q_norm/k_norm the format cannot "
                     f"hold (and it taps {cfg.num_taps} layers)")
    if cfg.num_taps != SPECFORGE_EAGLE3_TAPS:
        refuse(NAME, f"SpecForge's LlamaForCausalLMEagle3 fuses exactly {SPECFORGE_EAGLE3_TAPS} tapped layers "
                     f"(fc is [H, 3 * H]); this draft taps {cfg.num_taps}: {list(cfg.target_layer_ids)}")
    if cfg.num_draft_layers != 1:
        refuse(NAME, f"SpecForge's LlamaForCausalLMEagle3 has one draft layer (midlayer); this one has "
                     f"{cfg.num_draft_layers}")
    return "eagle3"


def specforge_config(cfg: DraftConfig) -> dict:
    d = backbone_dict(cfg)
    a = cfg.arch
    d.update(architectures=[SPECFORGE_DSPARK_ARCH], auto_map={"AutoModel": "dspark.DSparkDraftModel"},
             block_size=cfg.num_block_slots)
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    d["dflash_config"] = {
        "projector_type": "dspark", "attention_mode": "gqa" if a.num_key_value_heads < a.num_attention_heads else "mha",
        "mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids),
        "markov_rank": cfg.markov_rank, "markov_head_type": cfg.markov_head_type,
        "enable_confidence_head": cfg.enable_confidence_head,
        "confidence_head_with_markov": cfg.confidence_head_with_markov}
    return d


def specforge_eagle3_config(cfg: DraftConfig, vd: int) -> dict:
    # target_hidden_size is not written: LlamaForCausalLMEagle3 checks hasattr(config, "target_hidden_size"), so
    # even a null would be used as the fc width
    d = llama_backbone(cfg, backbone_dict(cfg))
    # kept as read (SpecForge configs copy it from the target config)
    d.update(architectures=[SPECFORGE_EAGLE3_ARCH], draft_vocab_size=vd,
             tie_word_embeddings=cfg.arch.tie_word_embeddings,
             eagle_config={"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids)})
    return d


def _write_block(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    return write_shared(draft, path, {"dspark": specforge_config, "dflash": zlab_config}[alg], options)


def _write_eagle3(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    """``midlayer.*`` names, the LM head cut to ``keep``, ``d2t``/``t2d`` always (zeros / all-true for a full
    vocabulary), no embedding unless ``options.store_embedding``."""
    cfg = draft.config
    dt = out_dtype(draft, options)
    tensors = deepspec_tensors(draft, dt)
    idx = np.asarray(keep if keep is not None else range(cfg.arch.vocab_size), np.int64)
    tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
               for k, v in tensors.items()}
    if keep is not None:
        tensors["lm_head.weight"] = np.ascontiguousarray(tensors["lm_head.weight"][idx])
    if not options.store_embedding:
        tensors.pop("embed_tokens.weight")
    tensors["d2t"], tensors["t2d"] = vocab_tables(idx, cfg.arch.vocab_size)
    return write_dir(draft, path, tensors, specforge_eagle3_config(cfg, len(idx)), dt, options.max_shard_bytes)


# per draft kind: the layout it is written in, and whether that layout holds a pruned vocabulary (d2t/t2d)
_PLANS = {BLOCK: _plan_block, EAGLE3: _plan_eagle3}
_WRITERS = {BLOCK: _write_block, EAGLE3: _write_eagle3}
_PRUNES = {BLOCK: False, EAGLE3: True}


def plan(cfg: DraftConfig, pruned: bool, allow_nonstandard: bool) -> str:
    kind = draft_family(cfg).kind
    return _PLANS[kind](cfg, kind.algorithm(cfg), pruned)


def write(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    return _WRITERS[draft_family(draft.config).kind](draft, path, alg, keep, options)


FORMAT = DraftFormat(NAME, detect, read, plan, lambda cfg: _PRUNES[draft_family(cfg).kind], write)
