"""DeepSpec draft checkpoints <-> nnx drafts (spec §1.9): ``config.json`` + safetensors, no ``model.`` prefix.

``load_draft`` reads every supported format (formats.py) and needs no target for DeepSpec's, which stores
the embedding and LM head: the architecture comes from ``architectures[0]`` (Qwen3DSparkModel for
DSpark and DFlash, Qwen3Eagle3Model for Eagle3) and every dimension is checked against the tensors, so a
misconfigured draft fails loudly instead of drafting garbage.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.convert.keymap import dtype_name, export_tensors
from dspark_jax.convert.names import DEEPSPEC_DSPARK_RULES, DEEPSPEC_EAGLE3_RULES
from dspark_jax.convert.safetensors_io import save_shards
from dspark_jax.config import read_config_json
from dspark_jax.drafts.config import GEMMA4_ARCHITECTURES, DraftConfig
from dspark_jax.drafts.temperatures import save_temperatures


def _draft_class(config: DraftConfig):
    if config.architecture in GEMMA4_ARCHITECTURES:
        from dspark_jax.convert.gemma4_draft import gemma4_draft_class

        return gemma4_draft_class(config)
    if config.is_eagle3:
        from dspark_jax.drafts.eagle3 import Eagle3Draft

        return Eagle3Draft, DEEPSPEC_EAGLE3_RULES
    from dspark_jax.drafts.dspark import DSparkDraft

    return DSparkDraft, DEEPSPEC_DSPARK_RULES


def load_draft(path: str | os.PathLike, dtype=None, *, target=None, sharding=None, attention_impl: str = "auto"):
    """Loads a draft directory in any supported format (DeepSpec, SpecForge, speculators, z-lab; detected from
    ``config.json``, see :mod:`dspark_jax.convert.formats`).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
      dtype: parameter/compute dtype; None = the checkpoint's ``dtype`` (bf16 for released drafts).
      target: a loaded target (or its HF directory): checks that the draft fits it and supplies the embedding /
        LM head for formats that do not store them (SpecForge, z-lab, some speculators exports).
      sharding: optional ``(nnx_path, shape, logical_axes) -> Sharding`` as in ``dj.load_target``.
    """
    from dspark_jax.convert.gemma4_draft import load_gemma4_draft
    from dspark_jax.drafts.gemma4_config import is_gemma4_draft_json

    if os.path.isdir(os.fspath(path)) and is_gemma4_draft_json(read_config_json(path)[0]):
        return load_gemma4_draft(path, dtype, sharding=sharding, attention_impl=attention_impl)
    from dspark_jax.convert.formats import load_checkpoint, read_checkpoint

    return load_checkpoint(read_checkpoint(path, target=target), dtype, target=target, sharding=sharding,
                           attention_impl=attention_impl)


def draft_to_torch_tensors(draft) -> dict:
    """The draft's tensors (trainable and frozen) under DeepSpec's key names and layouts."""
    _, rules = _draft_class(draft.config)
    return export_tensors(nnx.state(draft, nnx.Variable), rules)


def save_draft(draft, path: str | os.PathLike, *, max_shard_bytes: int = 50 * 2**30, dtype=None) -> str:
    """Writes what DeepSpec writes: ``config.json`` (the copied target config + draft keys) and
    ``model.safetensors`` with the exact DeepSpec key set.

    ``dtype``: tensor dtype on disk; None = the draft's compute dtype (so a draft trained in bf16 with fp32
    master weights is written in bf16, as DeepSpec writes it)."""
    path = os.fspath(path)
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else draft.dtype))
    tensors = {k: (v if v.dtype == out_dtype else v.astype(out_dtype)) for k, v in draft_to_torch_tensors(draft).items()}
    cfg = draft.config.to_hf_dict()      # first: a config DeepSpec cannot express must not leave tensors behind
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    cfg["dtype"] = dtype_name(out_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:   # calibration travels with the weights
        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path
