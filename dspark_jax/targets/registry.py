"""Target families by ``model_type``: which config class reads a ``config.json`` and which class builds the model.

Adding a family is one entry here (and one checkpoint module in ``convert/``, registered in ``convert/hf.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import ConfigError, TargetConfig, read_config_json
from dspark_jax.targets.deepseek_v3 import DeepseekV3ForCausalLM
from dspark_jax.targets.deepseek_v3_config import DEEPSEEK_V3_TYPES, DeepseekV3Config
from dspark_jax.targets.gemma4 import Gemma4ForCausalLM
from dspark_jax.targets.gemma4_config import GEMMA4_TYPES, Gemma4Config
from dspark_jax.targets.qwen3 import Qwen3ForCausalLM


@dataclasses.dataclass(frozen=True)
class TargetFamily:
    """``name``: the family (also the key of its checkpoint module); ``model_types``: the ``config.json`` values it
    reads; ``config_class``: has ``from_hf_dict(d, where)``, ``to_hf_dict()``; ``model_class``: ``(config, *, dtype,
    param_dtype, attention_impl, rngs)``."""

    name: str
    model_types: tuple[str, ...]
    config_class: type
    model_class: type


FAMILIES: tuple[TargetFamily, ...] = (
    TargetFamily("qwen3", ("qwen3", "qwen3_moe"), TargetConfig, Qwen3ForCausalLM),
    TargetFamily("gemma4", GEMMA4_TYPES, Gemma4Config, Gemma4ForCausalLM),
    TargetFamily("deepseek_v3", DEEPSEEK_V3_TYPES, DeepseekV3Config, DeepseekV3ForCausalLM),
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str | None, where: str = "config") -> TargetFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConfigError(f"{where}: model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")


def family_of_config(config) -> TargetFamily:
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family_of(config.model_type, type(config).__name__)
    raise TypeError(f"not a target config: {type(config).__name__}")


def family_of_model(model) -> TargetFamily:
    for family in FAMILIES:
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"not a target model: {type(model).__name__}")


def config_from_hf_dict(d: Mapping[str, Any], where: str = "config.json"):
    """The family's config for a ``config.json`` dict (by its ``model_type``)."""
    if "model_type" not in d:
        raise ConfigError(f"{where}: missing field 'model_type'")
    return family_of(d.get("model_type"), where).config_class.from_hf_dict(d, where)


def target_config_from_json(path: str | os.PathLike):
    d, where = read_config_json(path)
    return config_from_hf_dict(d, where)


def build_target(config, *, dtype="float32", seed: int = 0, attention_impl: str = "auto", rngs=None):
    """A randomly initialised target (N(0, initializer_range) linears, unit norms) of ``config``'s family
    (a :class:`TargetConfig`, ``Gemma4Config`` or ``DeepseekV3Config``). ``rngs`` (default ``nnx.Rngs(seed)``):
    e.g. :class:`~dspark_jax.nn.abstract.ShapeOnlyRngs` under ``nnx.eval_shape``."""
    family = family_of_config(config)
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    return family.model_class(config, dtype=jnp.dtype(dtype), attention_impl=attention_impl, rngs=rngs)
