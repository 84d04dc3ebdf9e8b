"""Gemma4 HF checkpoints <-> nnx targets: the key table and the load/save entry points ``dj.load_target`` /
``dj.save_target`` dispatch to for ``model_type`` 'gemma4_text' (and the text part of a multimodal 'gemma4').

A multimodal checkpoint keeps the text decoder under ``model.language_model.``; its vision/audio towers are
skipped. Saving always writes a text-only ``Gemma4ForCausalLM`` (``model.`` prefix).
"""

from __future__ import annotations

import json
import os
import re

from flax import nnx

from dspark_jax.convert.keymap import ShardingFn, dtype_name, export_tensors, fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import CHOICES, KeyRule
from dspark_jax.convert.safetensors_io import checkpoint_files, write_checkpoint_dir
from dspark_jax.nn.abstract import abstract_module
from dspark_jax.targets.gemma4 import Gemma4ForCausalLM
from dspark_jax.targets.gemma4_config import Gemma4Config

# Registered here rather than in names.py so the Gemma4 vocabulary stays in one file; prefixed to avoid clashes.
CHOICES.setdefault("g4_norm", r"input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
                              r"|post_feedforward_layernorm|post_per_layer_input_norm|post_feedforward_layernorm_1"
                              r"|post_feedforward_layernorm_2|pre_feedforward_layernorm_2")
CHOICES.setdefault("g4_ple_proj", r"per_layer_input_gate|per_layer_projection")
CHOICES.setdefault("g4_router_vec", r"scale|per_expert_scale")
CHOICES.setdefault("g4_experts", r"gate_up_proj|down_proj")


def gemma4_target_rules(prefix: str = "model.") -> tuple[KeyRule, ...]:
    """Key table of a Gemma4 text decoder whose base-model keys start with ``prefix``."""
    p = prefix
    return (
        KeyRule(f"{p}embed_tokens.weight", "embed_tokens.embedding"),
        KeyRule(f"{p}embed_tokens_per_layer.weight", "embed_tokens_per_layer.embedding"),
        KeyRule(f"{p}per_layer_model_projection.weight", "per_layer_model_projection.kernel", "transpose"),
        KeyRule(f"{p}per_layer_projection_norm.weight", "per_layer_projection_norm.weight"),
        KeyRule(f"{p}norm.weight", "norm.weight"),
        KeyRule("lm_head.weight", "lm_head.kernel", "transpose"),
        KeyRule(f"{p}layers.{{layer}}.{{g4_norm}}.weight", "layers.{layer}.{g4_norm}.weight"),
        KeyRule(f"{p}layers.{{layer}}.layer_scalar", "layers.{layer}.layer_scalar"),
        KeyRule(f"{p}layers.{{layer}}.self_attn.{{attn_proj}}.weight", "layers.{layer}.self_attn.{attn_proj}.kernel",
                "transpose"),
        KeyRule(f"{p}layers.{{layer}}.self_attn.{{attn_proj}}.bias", "layers.{layer}.self_attn.{attn_proj}.bias"),
        KeyRule(f"{p}layers.{{layer}}.self_attn.{{qk_norm}}.weight", "layers.{layer}.self_attn.{qk_norm}.weight"),
        KeyRule(f"{p}layers.{{layer}}.mlp.{{mlp_proj}}.weight", "layers.{layer}.mlp.{mlp_proj}.kernel", "transpose"),
        KeyRule(f"{p}layers.{{layer}}.{{g4_ple_proj}}.weight", "layers.{layer}.{g4_ple_proj}.kernel", "transpose"),
        KeyRule(f"{p}layers.{{layer}}.router.proj.weight", "layers.{layer}.router.proj.kernel", "transpose"),
        KeyRule(f"{p}layers.{{layer}}.router.{{g4_router_vec}}", "layers.{layer}.router.{g4_router_vec}"),
        KeyRule(f"{p}layers.{{layer}}.experts.{{g4_experts}}", "layers.{layer}.experts.{g4_experts}"),
    )


GEMMA4_TARGET_RULES = gemma4_target_rules("model.")
GEMMA4_MULTIMODAL_RULES = gemma4_target_rules("model.language_model.")
GEMMA4_IGNORED = (re.compile(r".*rotary_emb\..*inv_freq$"), re.compile(r".*embed_scale$"))
# towers of the multimodal checkpoint that a text target does not use
GEMMA4_MULTIMODAL_IGNORED = GEMMA4_IGNORED + (
    re.compile(r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\."),)


def load_gemma4_target(path: str, dtype="float32", *, sharding: ShardingFn | None = None,
                       attention_impl: str = "auto") -> Gemma4ForCausalLM:
    """Loads a Gemma4 checkpoint directory (``gemma4_text`` or multimodal ``gemma4``) as a text target."""
    with open(os.path.join(path, "config.json")) as f:
        multimodal = json.load(f).get("model_type") == "gemma4"
    config = Gemma4Config.from_json(path)
    dt = resolve_dtype(dtype)
    abstract = abstract_module(lambda rngs: Gemma4ForCausalLM(config, dtype=dt, attention_impl=attention_impl,
                                                                rngs=rngs))
    graphdef, abs_state = nnx.split(abstract)
    rules = GEMMA4_MULTIMODAL_RULES if multimodal else GEMMA4_TARGET_RULES
    ignored = GEMMA4_MULTIMODAL_IGNORED if multimodal else GEMMA4_IGNORED
    # K/V-sharing layers have no key/value weights; some exports still carry them (transformers skips them too)
    prefix = re.escape("model.language_model." if multimodal else "model.")
    ignored += tuple(re.compile(rf"^{prefix}layers\.{i}\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
                     for i, mode in enumerate(config.kv_sharing_modes) if mode == "reuse")
    values = read_state(abs_state, checkpoint_files(path), rules, ignored, dt, sharding,
                        skip_keys={"lm_head.weight"} if config.tie_word_embeddings else set())
    return nnx.merge(graphdef, fill_state(abs_state, values))


def gemma4_to_torch_tensors(model: Gemma4ForCausalLM) -> dict:
    """The model's parameters under ``Gemma4ForCausalLM``'s key names and layouts."""
    return export_tensors(nnx.state(model, nnx.Param), GEMMA4_TARGET_RULES)


def save_gemma4_target(model: Gemma4ForCausalLM, path: str, *, max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes ``config.json`` + safetensors as transformers' ``Gemma4ForCausalLM.save_pretrained`` does."""
    return write_checkpoint_dir(path, gemma4_to_torch_tensors(model),
                                model.config.to_hf_dict() | {"dtype": dtype_name(model.dtype)}, model.tokenizer,
                                max_shard_bytes=max_shard_bytes)
