"""z-lab's ``DFlashDraftModel`` (also SpecForge's DFlash export): a Qwen3 backbone config with ``dflash_config``
(``mask_token_id``, ``target_layer_ids``, output convention), ``block_size`` = slots, bonus-anchor (slot k >= 1
predicts its own position); no Markov or confidence head, no embedding or LM head stored (the target's)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from dspark_jax.config import ConfigError
from dspark_jax.convert.families import BLOCK, EAGLE3, draft_family
from dspark_jax.convert.formats.common import (
    DEFAULT_NUM_ANCHORS,
    SHARED,
    DraftCheckpoint,
    DraftFormat,
    ExportOptions,
    FormatError,
    arch_config,
    backbone_dict,
    deepspec_tensors,
    finish_shared,
    ids_field,
    make_config,
    out_dtype,
    refuse,
    write_dir,
)
from dspark_jax.drafts.config import BONUS_ANCHOR, DSPARK_ARCH, LAYER_OUTPUT, DraftConfig

NAME = "zlab"
DFLASH_ARCH = "DFlashDraftModel"
# the refusal SpecForge's DSpark / DFlash layouts share: neither has d2t/t2d
NO_VOCAB_TABLES = "SpecForge DSpark / z-lab DFlash checkpoints have no d2t/t2d tables (full vocabulary only)"


def detect(d: Mapping[str, Any], where: str) -> bool:
    """A ``DFlashDraftModel`` with ``dflash_config`` (SpecForge's DSpark projector is claimed by specforge first)."""
    dflash_config = d.get("dflash_config")
    if not isinstance(dflash_config, dict) or (d.get("architectures") or [None])[0] != DFLASH_ARCH:
        return False
    proj = dflash_config.get("projector_type")
    if proj not in (None, "dflash"):
        raise FormatError(f"{where}: dflash_config.projector_type={proj!r} (a SpecForge Domino/other "
                          "variant) is not a DFlash or DSpark draft this loader knows")
    if any(k in d for k in ("markov_rank", "markov_head_type")):
        raise FormatError(f"{where}: a {DFLASH_ARCH} config with Markov fields is ambiguous (a fork-"
                          "exported DSpark?); rename it to the DeepSpec or speculators layout first")
    return True


def read(path, d, where, raw, target=None) -> DraftCheckpoint:
    dc = d["dflash_config"]
    for k in ("mask_token_id", "target_layer_ids"):
        if k not in dc:
            raise ConfigError(f"{where}: missing field dflash_config.{k}")
    # older z-lab heads keep block_size at the top level, newer ones inside dflash_config
    bs = d.get("block_size", dc.get("block_size"))
    if bs is None:
        raise ConfigError(f"{where}: missing field 'block_size' (top level or dflash_config)")
    if not isinstance(bs, int) or bs < 2:
        raise ConfigError(f"{where}: block_size={bs!r}: a bonus-anchor block needs the anchor slot plus >= 1 draft")
    if dc.get("sample_from_anchor"):
        raise FormatError(f"{where}: dflash_config.sample_from_anchor=true is not a z-lab/SpecForge DFlash draft "
                          "(those are bonus-anchor); write it in the speculators layout instead")
    arch, extra = arch_config(d, where, {"dflash_config", "block_size", "num_target_layers", "architectures",
                                         "auto_map"})
    ids = ids_field(dc["target_layer_ids"], "dflash_config.target_layer_ids", where)
    cfg = make_config(
        where, architecture=DSPARK_ARCH, block_size=bs - 1, slot_convention=BONUS_ANCHOR,
        mask_token_id=int(dc["mask_token_id"]), target_layer_ids=ids, num_anchors=DEFAULT_NUM_ANCHORS,
        num_target_layers=d.get("num_target_layers"), markov_rank=0, enable_confidence_head=False,
        num_draft_layers=arch.num_hidden_layers, arch=arch, extra_json=extra,
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"))
    return finish_shared(path, NAME, d, where, raw, cfg, "dflash_config.target_layer_ids", ids, LAYER_OUTPUT,
                         algorithm="dflash")


def plan_bonus_anchor(fmt: str, cfg: DraftConfig, alg: str) -> str:
    """The z-lab layout's conditions (``fmt``: the format asked for, z-lab or SpecForge's DFlash export)."""
    if cfg.slot_convention != BONUS_ANCHOR:
        refuse(fmt, "z-lab/SpecForge DFlash drafts are bonus-anchor (slot k predicts its own position); this "
                    "draft is anchor-first (DeepSpec), and the runtime would draft one position early. Use "
                    "--to specforge (a DSpark export with markov_rank 0 keeps anchor-first) or speculators")
    if alg != "dflash":
        refuse(fmt, "a bonus-anchor draft with a Markov or confidence head has no z-lab/SpecForge layout "
                    "(SpecForge DSpark is anchor-first); use --to speculators (sample_from_anchor=false)")
    return "dflash"


def _plan_block(cfg: DraftConfig, alg: str, pruned: bool) -> str:
    if pruned:
        refuse(NAME, NO_VOCAB_TABLES)
    return plan_bonus_anchor(NAME, cfg, alg)


def _plan_eagle3(cfg: DraftConfig, alg: str, pruned: bool) -> str:
    refuse(NAME, "z-lab checkpoints are DFlash drafts; an Eagle3 draft has no z-lab layout")


_PLANS = {BLOCK: _plan_block, EAGLE3: _plan_eagle3}


def plan(cfg: DraftConfig, pruned: bool, allow_nonstandard: bool) -> str:
    family = draft_family(cfg)
    return _PLANS[family.kind](cfg, family.kind.algorithm(cfg), pruned)


def zlab_config(cfg: DraftConfig) -> dict:
    d = backbone_dict(cfg)
    d.update(architectures=[DFLASH_ARCH], auto_map={"AutoModel": "dflash.DFlashDraftModel"},
             block_size=cfg.num_block_slots)
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    d["dflash_config"] = {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)}
    return d


def write_shared(draft, path: str, config_of: Callable[[DraftConfig], dict], options: ExportOptions) -> str:
    """Writes a draft whose layout leaves the embedding and LM head to the target (z-lab, SpecForge DSpark);
    ``config_of``: the draft's config -> the layout's ``config.json``."""
    dt = out_dtype(draft, options)
    tensors = deepspec_tensors(draft, dt)
    for k in SHARED:
        tensors.pop(k)
    return write_dir(draft, path, tensors, config_of(draft.config), dt, options.max_shard_bytes)


def write(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    return write_shared(draft, path, zlab_config, options)


FORMAT = DraftFormat(NAME, detect, read, plan, lambda cfg: False, write)
