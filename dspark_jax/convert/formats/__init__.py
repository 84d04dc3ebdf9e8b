"""Draft checkpoints in the formats other stacks write (docs/FORMATS.md; the formats: DRAFT_FORMATS.md).

Every format is read into the same draft modules through DeepSpec's tensor names: a reader turns a directory into
a :class:`DraftCheckpoint` (a canonical :class:`DraftConfig` plus a map from DeepSpec key to a lazy tensor), and a
writer turns a draft back into the format's ``config.json`` and tensors. The two conventions live in the config:

- tapped layers: ``DraftConfig.target_layer_ids`` are layer-*output* ids; speculators' ``aux`` ids are inputs,
  so ``aux = id + 1`` (``layer_ids_to`` / ``layer_ids_from``).
- block slots: ``slot_convention`` (anchor-first vs bonus-anchor); the file's ``block_size`` is the slot count
  (``num_block_slots``), ours the number of drafted tokens.

One module per format, each a :class:`DraftFormat` (detect -> read -> plan / write), registered in
:data:`REGISTRY`: ``deepspec`` (Qwen3DSparkModel / Qwen3Eagle3Model), ``specforge`` (DSparkDraftModel with
``dflash_config``, and the Llama Eagle3 ``LlamaForCausalLMEagle3``; its DFlash export is the z-lab layout),
``speculators`` (``speculators_model_type`` dspark / dflash / eagle3, pruned vocab via ``d2t``/``t2d``), ``zlab``
(DFlashDraftModel, bonus-anchor). Which draft family a config is (its module, key table, and block or Eagle3
kind) is looked up once in convert/families.py. What a format cannot represent is refused with the reason
(:class:`FormatError`), never written lossily.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.convert.families import algorithm_of, draft_family
from dspark_jax.convert.formats import deepspec, specforge, speculators, zlab
from dspark_jax.convert.formats.common import (
    DEFAULT_EAGLE3_TOKENS,
    DEFAULT_NUM_ANCHORS,
    FORMAT_LABELS,
    FORMATS,
    SHARED,
    DraftCheckpoint,
    DraftFormat,
    ExportOptions,
    FormatError,
    refuse,
)
from dspark_jax.convert.formats.describe import describe, format_description
from dspark_jax.convert.formats.load import check_fits, load_checkpoint, target_source
from dspark_jax.convert.formats.specforge import SPECFORGE_DSPARK_ARCH, SPECFORGE_EAGLE3_ARCH
from dspark_jax.convert.formats.speculators import SPECULATORS_ARCHS, SPECULATORS_VERSION
from dspark_jax.convert.formats.zlab import DFLASH_ARCH
from dspark_jax.convert.safetensors_io import CheckpointError, checkpoint_files, iter_tensors
from dspark_jax.drafts import config as dcfg

__all__ = [
    "FORMATS", "FORMAT_LABELS", "REGISTRY", "SHARED", "SPECULATORS_ARCHS", "SPECULATORS_VERSION", "DFLASH_ARCH",
    "SPECFORGE_DSPARK_ARCH", "SPECFORGE_EAGLE3_ARCH", "DEFAULT_EAGLE3_TOKENS", "DEFAULT_NUM_ANCHORS",
    "DraftCheckpoint", "DraftFormat", "FormatError", "algorithm_of", "check_fits", "describe", "detect_format",
    "export_draft", "format_description", "load_checkpoint", "plan_export", "read_checkpoint", "target_source",
]

REGISTRY: dict[str, DraftFormat] = {m.FORMAT.name: m.FORMAT for m in (deepspec, specforge, speculators, zlab)}
# DRAFT_FORMATS §6.11's sniffing order: a speculators config may carry any architecture; SpecForge claims its
# DSpark projector before z-lab sees a DFlashDraftModel; DeepSpec's architectures come last
_SNIFF_ORDER = ("speculators", "specforge", "zlab", "deepspec")


def detect_format(d: Mapping[str, Any], where: str = "config.json") -> str:
    """``config.json`` -> one of :data:`FORMATS`, or a FormatError."""
    for name in _SNIFF_ORDER:
        if REGISTRY[name].detect(d, where):
            return name
    archs = d.get("architectures") or []
    known = ", ".join(f"{f} ({FORMAT_LABELS[f]})" for f in FORMATS)
    raise ConfigError(f"{where}: architectures={archs!r} is not a draft format this loader knows; recognised: "
                      f"{known} (DeepSpec: architectures[0] in {dcfg.ARCHITECTURES}; speculators: "
                      "speculators_model_type; SpecForge/z-lab: dflash_config)")


def read_checkpoint(path: str | os.PathLike, target=None) -> DraftCheckpoint:
    """Parses ``config.json`` and the safetensors headers (tensors stay on disk) and checks them against each
    other: tap count x hidden size vs ``fc``, vocab sizes, ``mask_token_id``, ``d2t``/``t2d``, conventions.

    ``target`` (optional: a loaded target, a TargetConfig, or an HF directory / config.json) is consulted only
    where the file leaves the tapped layers to the target's depth (SpecForge Eagle3 without ``eagle_config``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"draft checkpoint directory {path!r} does not exist")
    d, where = read_config_json(path)
    fmt = detect_format(d, where)
    raw = {}
    for file, key, handle in iter_tensors(checkpoint_files(path)):
        if key.startswith("_orig_mod."):     # torch.compile's wrapper; DeepSpec strips it on save
            key = key[len("_orig_mod."):]
        if key in raw:
            raise CheckpointError(f"{file}: key {key!r} is given twice (with and without '_orig_mod.')")
        raw[key] = handle
    return REGISTRY[fmt].read(path, d, where, raw, target)


def plan_export(cfg: dcfg.DraftConfig, fmt: str, *, pruned: bool = False, allow_nonstandard: bool = False) -> str:
    """What ``fmt`` would hold this draft as (``dspark``/``dflash``/``eagle3``), or a FormatError with the reason."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown draft format {fmt!r}; one of {FORMATS}")
    only = draft_family(cfg).deepspec_only
    if only is not None and fmt != deepspec.NAME:
        refuse(fmt, only)
    return REGISTRY[fmt].plan(cfg, pruned, allow_nonstandard)


def export_draft(draft, path: str | os.PathLike, fmt: str, *, draft_vocab=None, allow_nonstandard: bool = False,
                 verifier: str | None = None, verifier_architectures=("Qwen3ForCausalLM",), dtype=None,
                 max_shard_bytes: int = 50 * 2**30, store_embedding: bool = False) -> str:
    """Writes ``draft`` as ``fmt`` (one of :data:`FORMATS`).

    draft_vocab: prune to these target ids (speculators, and SpecForge Eagle3; explicit request; sorted, unique).
    store_embedding: SpecForge Eagle3 only: also write ``embed_tokens.weight`` (SpecForge drops the frozen
      embedding from its checkpoints, SGLang's export too; its HF export with ``--embedding-source`` keeps it).
    allow_nonstandard: DeepSpec only: write a bonus-anchor draft with ``sample_from_anchor: false``.
    verifier: speculators' ``verifier.name_or_path`` (default: the Eagle3 ``target_model_name_or_path``).
    dtype: tensor dtype on disk (None = the draft's compute dtype, as ``dj.save_draft``).
    """
    cfg = draft.config
    path = os.fspath(path)
    sel = None
    if draft_vocab is not None:
        sel = tuple(sorted(set(int(i) for i in draft_vocab)))
        if cfg.draft_vocab is not None and not set(sel) <= set(cfg.draft_vocab):
            raise FormatError("the draft is already pruned; a new draft vocab must be a subset of its own ids")
        if not sel or sel[0] < 0 or sel[-1] >= cfg.arch.vocab_size:
            raise FormatError(f"draft vocab ids must lie in [0, {cfg.arch.vocab_size})")
        if fmt not in REGISTRY or not REGISTRY[fmt].prunes(cfg):
            raise FormatError(f"vocabulary pruning is only written in the speculators format and SpecForge Eagle3 "
                              f"(d2t/t2d), not {fmt!r}")
    elif cfg.draft_vocab is not None:
        sel = cfg.draft_vocab
    pruned = sel is not None and len(sel) < cfg.arch.vocab_size
    alg = plan_export(cfg, fmt, pruned=pruned, allow_nonstandard=allow_nonstandard)
    options = ExportOptions(dtype=dtype, max_shard_bytes=max_shard_bytes, verifier=verifier,
                            verifier_architectures=verifier_architectures, store_embedding=store_embedding)
    return REGISTRY[fmt].write(draft, path, alg, sel if pruned else None, options)
