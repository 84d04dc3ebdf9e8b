"""DeepSpec draft checkpoints <-> nnx drafts (spec §1.9): ``config.json`` + safetensors, no ``model.`` prefix.

``load_draft`` needs no target: the architecture comes from ``architectures[0]`` (Qwen3DSparkModel for
DSpark and DFlash, Qwen3Eagle3Model for Eagle3) and every dimension is checked against the tensors, so a
misconfigured draft fails loudly instead of drafting garbage.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.convert.keymap import dtype_name, export_tensors, fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import DEEPSPEC_DSPARK_RULES, DEEPSPEC_EAGLE3_RULES, DEEPSPEC_IGNORED
from dspark_jax.convert.safetensors_io import checkpoint_files, save_shards
from dspark_jax.drafts.config import DraftConfig


def _draft_class(config: DraftConfig):
    if config.is_eagle3:
        from dspark_jax.drafts.eagle3 import Eagle3Draft

        return Eagle3Draft, DEEPSPEC_EAGLE3_RULES
    from dspark_jax.drafts.dspark import DSparkDraft

    return DSparkDraft, DEEPSPEC_DSPARK_RULES


def load_draft(path: str | os.PathLike, dtype=None, *, sharding=None, attention_impl: str = "auto"):
    """Loads a DeepSpec DSpark / DFlash / Eagle3 draft directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
      dtype: parameter/compute dtype; None = the checkpoint's ``dtype`` (bf16 for released drafts).
      sharding: optional ``(nnx_path, shape, logical_axes) -> Sharding`` as in ``dj.load_target``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"draft checkpoint directory {path!r} does not exist")
    config = DraftConfig.from_json(path)
    dt = resolve_dtype(dtype if dtype is not None else config.dtype)
    cls, rules = _draft_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dt, attention_impl=attention_impl))
    graphdef, abs_state = nnx.split(abstract)
    files = checkpoint_files(path)
    values = read_state(abs_state, files, rules, DEEPSPEC_IGNORED, dt, sharding, strip_prefix="_orig_mod.")
    draft = nnx.merge(graphdef, fill_state(abs_state, values))
    from dspark_jax.decode.calibrate import attach_saved_temperatures

    return attach_saved_temperatures(draft, path)   # STS temperatures from `dspark calibrate`, when present


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
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    cfg = draft.config.to_hf_dict()
    cfg["dtype"] = dtype_name(out_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:   # calibration travels with the weights
        from dspark_jax.decode.calibrate import save_temperatures

        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path
