"""``dj.load_draft`` / ``dj.save_draft``: draft checkpoints <-> nnx drafts.

``load_draft`` reads every supported format (convert/formats/) and needs no target for DeepSpec's, which stores
the embedding and LM head: the architecture comes from ``architectures[0]`` (Qwen3DSparkModel for
DSpark and DFlash, Qwen3Eagle3Model for Eagle3) and every dimension is checked against the tensors, so a
misconfigured draft fails loudly instead of drafting garbage. ``save_draft`` writes DeepSpec's layout
(spec §1.9: ``config.json`` + safetensors, no ``model.`` prefix; convert/formats/deepspec.py).
"""

from __future__ import annotations

import os

from dspark_jax.config import read_config_json
from dspark_jax.convert.families import draft_to_torch_tensors
from dspark_jax.convert.formats import load_checkpoint, read_checkpoint
from dspark_jax.convert.formats.deepspec import save_draft
from dspark_jax.convert.gemma4_draft import load_gemma4_draft
from dspark_jax.drafts.gemma4_config import is_gemma4_draft_json

__all__ = ["draft_to_torch_tensors", "load_draft", "save_draft"]


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
    # a Gemma4 draft's config.json is only DeepSpec's, and its loader reads the directory itself
    if os.path.isdir(os.fspath(path)) and is_gemma4_draft_json(read_config_json(path)[0]):
        return load_gemma4_draft(path, dtype, sharding=sharding, attention_impl=attention_impl)
    return load_checkpoint(read_checkpoint(path, target=target), dtype, target=target, sharding=sharding,
                           attention_impl=attention_impl)
