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

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.config import read_config_json
from dspark_jax.convert.keymap import (
    dtype_name,
    export_tensors,
    fill_state,
    read_state,
    resolve_dtype,
)
from dspark_jax.convert.names import DEEPSPEC_DSPARK_RULES, KeyRule, with_choices
from dspark_jax.convert.safetensors_io import checkpoint_files, save_shards
from dspark_jax.drafts.build import DRAFT_CLASSES
from dspark_jax.drafts.config import GEMMA4_DSPARK_ARCH, GEMMA4_EAGLE3_ARCH, DraftConfig
from dspark_jax.drafts.temperatures import attach_saved_temperatures, save_temperatures
from dspark_jax.nn.abstract import abstract_module

# a draft layer's sandwich norms (Eagle3's hidden_norm has a rule of its own)
_DRAFT_NORM = {"g4_draft_norm": r"input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
                                r"|post_feedforward_layernorm"}

GEMMA4_DRAFT_RULES: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "embed_tokens"),
    KeyRule("lm_head.weight", "lm_head"),
    KeyRule("fc.weight", "fc.kernel", "transpose"),
    KeyRule("hidden_norm.weight", "hidden_norm.weight"),
    KeyRule("norm.weight", "norm.weight"),
    *with_choices((KeyRule("layers.{layer}.{g4_draft_norm}.weight", "layers.{layer}.{g4_draft_norm}.weight"),),
                  _DRAFT_NORM),
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
# architectures[0] -> key table (the class: drafts/build.py DRAFT_CLASSES); convert/families.py lists both
GEMMA4_DRAFT_RULES_OF = {GEMMA4_DSPARK_ARCH: GEMMA4_DRAFT_RULES, GEMMA4_EAGLE3_ARCH: GEMMA4_EAGLE3_RULES}


def load_gemma4_draft(path: str | os.PathLike, dtype=None, *, sharding=None, attention_impl: str = "auto"):
    """Loads a DeepSpec ``Gemma4DSparkModel`` directory (strict: every key and shape checked)."""
    d, where = read_config_json(path)
    cfg = DraftConfig.from_hf_dict(d, where)
    cls, rules = DRAFT_CLASSES[cfg.architecture], GEMMA4_DRAFT_RULES_OF[cfg.architecture]
    dt = resolve_dtype(dtype if dtype is not None else cfg.dtype)
    abstract = abstract_module(lambda rngs: cls(cfg, dtype=dt, attention_impl=attention_impl, rngs=rngs))
    graphdef, abs_state = nnx.split(abstract)
    values = read_state(abs_state, checkpoint_files(os.fspath(path)), rules, GEMMA4_DRAFT_IGNORED, dt,
                        sharding, strip_prefix="_orig_mod.")
    draft = nnx.merge(graphdef, fill_state(abs_state, values))
    return attach_saved_temperatures(draft, os.fspath(path))


def gemma4_draft_tensors(draft) -> dict[str, np.ndarray]:
    return export_tensors(nnx.state(draft, nnx.Variable), GEMMA4_DRAFT_RULES_OF[draft.config.architecture])


def save_gemma4_draft(draft, path: str | os.PathLike, *, max_shard_bytes: int = 50 * 2**30, dtype=None) -> str:
    """Writes ``config.json`` + ``model.safetensors`` with DeepSpec's Gemma4 key set (see module doc)."""
    path = os.fspath(path)
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else draft.dtype))
    cfg = draft.config.to_hf_dict()
    tensors = {k: (v if v.dtype == out_dtype else v.astype(out_dtype)) for k, v in gemma4_draft_tensors(draft).items()}
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    cfg["dtype"] = dtype_name(out_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:
        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path
