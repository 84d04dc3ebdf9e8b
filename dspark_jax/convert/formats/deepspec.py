"""DeepSpec's own draft layout (``Qwen3DSparkModel`` / ``Qwen3Eagle3Model``, and the Gemma4 drafts; spec §1.9):
``config.json`` = the copied target config + the draft keys, tensors under DeepSpec's names with no ``model.``
prefix, the frozen embedding and LM head stored. The names every other format is read into."""

from __future__ import annotations

import os
from typing import Any, Mapping

from dspark_jax.convert.families import algorithm_of
from dspark_jax.convert.formats.common import (
    SHARED,
    DraftCheckpoint,
    DraftFormat,
    ExportOptions,
    check_tensors,
    deepspec_tensors,
    file_listing,
    handle_lazy,
    out_dtype,
    refuse,
    write_dir,
)
from dspark_jax.convert.safetensors_io import CheckpointError
from dspark_jax.drafts import config as dcfg
from dspark_jax.drafts.config import BONUS_ANCHOR, EAGLE3_LLAMA, LAYER_OUTPUT, DraftConfig

NAME = "deepspec"


def save_draft(draft, path: str | os.PathLike, *, max_shard_bytes: int = 50 * 2**30, dtype=None) -> str:
    """Writes what DeepSpec writes: ``config.json`` (the copied target config + draft keys) and
    ``model.safetensors`` with the exact DeepSpec key set.

    ``dtype``: tensor dtype on disk; None = the draft's compute dtype (so a draft trained in bf16 with fp32
    master weights is written in bf16, as DeepSpec writes it)."""
    options = ExportOptions(dtype=dtype, max_shard_bytes=max_shard_bytes)
    dt = out_dtype(draft, options)
    tensors = deepspec_tensors(draft, dt)
    config = draft.config.to_hf_dict()      # first: a config DeepSpec cannot express must not leave tensors behind
    return write_dir(draft, os.fspath(path), tensors, config, dt, max_shard_bytes)


def detect(d: Mapping[str, Any], where: str) -> bool:
    return (d.get("architectures") or [None])[0] in dcfg.ARCHITECTURES   # DraftConfig's parser names missing fields


def read(path, d, where, raw, target=None) -> DraftCheckpoint:
    cfg = DraftConfig.from_hf_dict(d, where=where)
    v = cfg.arch.vocab_size
    rows = {"embed_tokens.weight": v, "lm_head.weight": v}
    if cfg.has_markov:
        rows.update({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": v})
    check_tensors(where, cfg, raw, "target_layer_ids", cfg.target_layer_ids, rows)
    shared = tuple(k for k in SHARED if k not in raw)
    if shared:
        # DeepSpec's own loader would initialise them at random; refuse rather than pretend
        raise CheckpointError(f"{where}: a DeepSpec draft must store {list(shared)} (the frozen target copies); "
                              "they are missing")
    return DraftCheckpoint(path, NAME, algorithm_of(cfg), cfg, {k: handle_lazy(h) for k, h in raw.items()},
                           (), file_listing(raw), "target_layer_ids", cfg.target_layer_ids, LAYER_OUTPUT,
                           verifier=cfg.target_model_name_or_path)


def plan(cfg: DraftConfig, pruned: bool, allow_nonstandard: bool) -> str:
    # only an Eagle3 config can name the Llama layer (DraftConfig.validate)
    if cfg.eagle3_variant == EAGLE3_LLAMA:
        refuse(NAME, "this is a Llama-style Eagle3 (SpecForge's LlamaForCausalLMEagle3: no q_norm/k_norm); "
                     "DeepSpec's Qwen3Eagle3Model has q/k norms, and zero-filling them is not the same layer")
    if pruned:
        refuse(NAME, "DeepSpec drafts always propose over the full vocabulary (no d2t); un-pruning would give "
                     "formerly impossible tokens probability")
    if cfg.slot_convention == BONUS_ANCHOR and not allow_nonstandard:
        refuse(NAME, "it uses the bonus-anchor slot convention, which DeepSpec's code has no flag for (it would "
                     "load and draft one position early). Write it as speculators (sample_from_anchor=false), or "
                     "pass --allow-nonstandard to add 'sample_from_anchor: false', which dspark-jax and vLLM's "
                     "native DSpark loader read but DeepSpec ignores")
    return algorithm_of(cfg)


def write(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    return save_draft(draft, path, max_shard_bytes=options.max_shard_bytes, dtype=options.dtype)


FORMAT = DraftFormat(NAME, detect, read, plan, lambda cfg: False, write)
