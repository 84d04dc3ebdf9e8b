"""Draft families as data: per ``config.json`` architecture, the draft module, its DeepSpec key table and its kind.

Every format reads into and writes from DeepSpec's tensor names, so a family's key table is the one choice a
converter makes per architecture; the kind (block drafting: DSpark / DFlash, or chain drafting: Eagle3) says
which of a format's per-kind tables (config fields, refusals, inspect lines) applies. Formats look both up here
instead of testing the config's variant in each function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from flax import nnx

from dspark_jax.convert.gemma4_draft import GEMMA4_DRAFT_RULES, GEMMA4_EAGLE3_RULES, load_gemma4_draft
from dspark_jax.convert.keymap import export_tensors
from dspark_jax.convert.names import DEEPSPEC_DSPARK_RULES, DEEPSPEC_EAGLE3_RULES, KeyRule
from dspark_jax.drafts.build import DRAFT_CLASSES
from dspark_jax.drafts.config import DSPARK_ARCH, EAGLE3_ARCH, GEMMA4_DSPARK_ARCH, GEMMA4_EAGLE3_ARCH, DraftConfig


@dataclasses.dataclass(frozen=True)
class DraftKind:
    """How a family drafts, as far as checkpoints care.

    ``algorithm``: config -> the name formats file it under (``dspark`` / ``dflash`` / ``eagle3``);
    ``uses_mask_token``: whether ``mask_token_id`` is a real token id that must fit the target's vocabulary;
    ``describe``: config -> the kind's fields of ``dspark inspect``'s JSON.
    """

    name: str
    algorithm: Callable[[DraftConfig], str]
    uses_mask_token: bool
    describe: Callable[[DraftConfig], dict[str, Any]]


def _block_algorithm(cfg: DraftConfig) -> str:
    return "dspark" if (cfg.has_markov or cfg.has_confidence) else "dflash"


def _block_describe(cfg: DraftConfig) -> dict[str, Any]:
    return dict(slot_convention=cfg.slot_convention, block_slots=cfg.num_block_slots, drafts_per_block=cfg.block_size,
                mask_token_id=cfg.mask_token_id, markov_rank=cfg.markov_rank,
                markov_head_type=cfg.markov_head_type if cfg.has_markov else None, confidence_head=cfg.has_confidence)


def _eagle3_describe(cfg: DraftConfig) -> dict[str, Any]:
    return {"ttt_length": cfg.ttt_length, "eagle3_variant": cfg.eagle3_variant}


BLOCK = DraftKind("block", _block_algorithm, True, _block_describe)
EAGLE3 = DraftKind("eagle3", lambda cfg: "eagle3", False, _eagle3_describe)


@dataclasses.dataclass(frozen=True)
class DraftFamily:
    """One ``architectures[0]``: ``module`` (the nnx draft class), ``rules`` (DeepSpec key <-> nnx path),
    ``kind``; ``load_dir`` (path, dtype, sharding=, attention_impl=) -> draft for a family whose config only
    DeepSpec writes (read straight from the directory), with ``deepspec_only`` the reason other formats refuse it."""

    architecture: str
    module: type
    rules: tuple[KeyRule, ...]
    kind: DraftKind
    load_dir: Callable | None = None
    deepspec_only: str | None = None


_GEMMA4_ONLY = ("only DeepSpec (and vLLM's Gemma4DSparkModel, which reads DeepSpec's files) has a Gemma4 draft "
                "backbone")

FAMILIES: dict[str, DraftFamily] = {
    DSPARK_ARCH: DraftFamily(DSPARK_ARCH, DRAFT_CLASSES[DSPARK_ARCH], DEEPSPEC_DSPARK_RULES, BLOCK),
    EAGLE3_ARCH: DraftFamily(EAGLE3_ARCH, DRAFT_CLASSES[EAGLE3_ARCH], DEEPSPEC_EAGLE3_RULES, EAGLE3),
    GEMMA4_DSPARK_ARCH: DraftFamily(GEMMA4_DSPARK_ARCH, DRAFT_CLASSES[GEMMA4_DSPARK_ARCH], GEMMA4_DRAFT_RULES, BLOCK,
                                    load_gemma4_draft, _GEMMA4_ONLY),
    GEMMA4_EAGLE3_ARCH: DraftFamily(GEMMA4_EAGLE3_ARCH, DRAFT_CLASSES[GEMMA4_EAGLE3_ARCH], GEMMA4_EAGLE3_RULES, EAGLE3,
                                    load_gemma4_draft, _GEMMA4_ONLY),
}


def draft_family(cfg: DraftConfig) -> DraftFamily:
    return FAMILIES[cfg.architecture]


def algorithm_of(cfg: DraftConfig) -> str:
    return draft_family(cfg).kind.algorithm(cfg)


def draft_to_torch_tensors(draft) -> dict[str, np.ndarray]:
    """The draft's tensors (trainable and frozen) under DeepSpec's key names and layouts."""
    return export_tensors(nnx.state(draft, nnx.Variable), draft_family(draft.config).rules)
