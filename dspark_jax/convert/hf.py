"""Hugging Face target checkpoints <-> nnx targets, tensor by tensor, driven by key tables (names.py and one module
per family), dispatched by the family registry (targets/registry.py).

Loading never needs torch: safetensors are read with numpy, cast on the host and placed on the device (or
straight onto a sharding, when one is given), one tensor at a time.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, TargetConfig, read_config_json
from dspark_jax.convert.deepseek_v3 import load_deepseek_v3_target, save_deepseek_v3_target
from dspark_jax.convert.gemma4 import load_gemma4_target, save_gemma4_target
from dspark_jax.convert.keymap import ShardingFn, dtype_name, export_tensors, fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import QWEN3_IGNORED, QWEN3_TARGET_RULES
from dspark_jax.convert.safetensors_io import CheckpointError, checkpoint_files, write_checkpoint_dir
from dspark_jax.nn.abstract import abstract_module
from dspark_jax.targets.qwen3 import Qwen3ForCausalLM
from dspark_jax.targets.registry import family_of, family_of_model

# ---- load -------------------------------------------------------------------------------------

def load_target(path: str | os.PathLike, dtype="float32", *, sharding: ShardingFn | None = None,
                attention_impl: str = "auto", load_tokenizer: bool = True):
    """Loads an HF checkpoint directory of a supported family (Qwen3 / Qwen3-MoE, Gemma4, DeepSeek-V3; by
    ``model_type``) into an nnx target.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
      dtype: parameter and compute dtype ("float32" or "bfloat16"); tensors are cast on the host.
      sharding: optional ``(nnx_path, shape, logical_axes) -> Sharding``; each tensor is placed straight there.
      load_tokenizer: attach ``AutoTokenizer.from_pretrained(path)`` as ``.tokenizer`` when the dir has one.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    d, where = read_config_json(path)
    if d.get("model_type") is None:
        raise ConfigError(f"{where}: missing field 'model_type'")
    family = family_of(d["model_type"], where)
    model = _CHECKPOINTS[family.name][0](path, dtype, sharding=sharding, attention_impl=attention_impl)
    if load_tokenizer:
        model.attach_tokenizer(_maybe_tokenizer(path))
    return model


def _load_qwen3(path: str, dtype, *, sharding: ShardingFn | None, attention_impl: str) -> Qwen3ForCausalLM:
    config = TargetConfig.from_json(path)
    dt = resolve_dtype(dtype)
    abstract = abstract_module(lambda rngs: Qwen3ForCausalLM(config, dtype=dt, attention_impl=attention_impl,
                                                               rngs=rngs))
    graphdef, abs_state = nnx.split(abstract)
    values = read_state(abs_state, checkpoint_files(path), QWEN3_TARGET_RULES, QWEN3_IGNORED, dt, sharding,
                        skip_keys={"lm_head.weight"} if config.tie_word_embeddings else set())
    return nnx.merge(graphdef, fill_state(abs_state, values))


def _maybe_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    return load_tokenizer(path)


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)``; a tokenizer that needs a library we do not install by default (a
    SentencePiece ``tokenizer.model`` without ``tokenizer.json``) is a CheckpointError naming the extra."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ImportError, ValueError) as e:
        text = str(e).lower()
        if isinstance(e, ImportError) or any(k in text for k in ("sentencepiece", "protobuf", "tiktoken")):
            raise CheckpointError(f"{path}: the tokenizer could not be loaded ({str(e).strip().splitlines()[0]}); "
                                  "a SentencePiece tokenizer needs pip install 'dspark_jax[sentencepiece]'") from e
        raise


# ---- save -------------------------------------------------------------------------------------

def target_to_torch_tensors(model: Qwen3ForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters under transformers' key names and layouts (per-expert MoE names)."""
    return export_tensors(nnx.state(model, nnx.Param), QWEN3_TARGET_RULES)


def save_target(model, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes ``config.json`` + safetensors (+ tokenizer files) in the layout transformers writes."""
    try:
        family = family_of_model(model)
    except TypeError:
        raise TypeError(f"save_target takes a target model, got {type(model).__name__}") from None
    return _CHECKPOINTS[family.name][1](model, os.fspath(path), max_shard_bytes=max_shard_bytes)


def _save_qwen3(model: Qwen3ForCausalLM, path: str, *, max_shard_bytes: int) -> str:
    return write_checkpoint_dir(path, target_to_torch_tensors(model),
                                model.config.to_hf_dict() | {"dtype": dtype_name(model.dtype)}, model.tokenizer,
                                max_shard_bytes=max_shard_bytes)


# family name (targets/registry.py) -> (load, save)
_CHECKPOINTS = {
    "qwen3": (_load_qwen3, _save_qwen3),
    "gemma4": (load_gemma4_target, save_gemma4_target),
    "deepseek_v3": (load_deepseek_v3_target, save_deepseek_v3_target),
}


__all__ = ["load_target", "save_target", "target_to_torch_tensors", "CheckpointError", "ConfigError"]
