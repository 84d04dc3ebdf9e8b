"""DeepSeek-V3-family HF checkpoints <-> nnx targets: the key table and the load/save entry points ``dj.load_target``
/ ``dj.save_target`` dispatch to for ``model_type`` 'deepseek_v3'.

Loading reads the released layout (per-expert ``mlp.experts.{e}.*_proj.weight``) and transformers' in-memory fused
one; saving writes the released layout, which transformers reads back. The multi-token-prediction layers a checkpoint
stores after the decoder layers (``model.layers.{num_hidden_layers}...``) are recognised and skipped with a note.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.convert.keymap import ShardingFn, dtype_name, export_tensors, fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import KeyRule
from dspark_jax.convert.safetensors_io import CheckpointError, checkpoint_files, iter_tensors, write_checkpoint_dir
from dspark_jax.nn.abstract import abstract_module
from dspark_jax.targets.deepseek_v3 import DeepseekV3ForCausalLM
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config

log = logging.getLogger(__name__)

_ATTN = "model.layers.{layer}.self_attn."
_MLP = "model.layers.{layer}.mlp."

DEEPSEEK_V3_TARGET_RULES: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "embed_tokens.embedding"),
    KeyRule("model.norm.weight", "norm.weight"),
    KeyRule("lm_head.weight", "lm_head.kernel", "transpose"),
    KeyRule("model.layers.{layer}.{layer_norm}.weight", "layers.{layer}.{layer_norm}.weight"),
    *(KeyRule(f"{_ATTN}{name}.weight", f"layers.{{layer}}.self_attn.{name}.kernel", "transpose")
      for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    *(KeyRule(f"{_ATTN}{name}.bias", f"layers.{{layer}}.self_attn.{name}.bias")
      for name in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")),
    *(KeyRule(f"{_ATTN}{name}.weight", f"layers.{{layer}}.self_attn.{name}.weight")
      for name in ("q_a_layernorm", "kv_a_layernorm")),
    KeyRule(_MLP + "{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}.kernel", "transpose"),
    KeyRule(_MLP + "shared_experts.{mlp_proj}.weight", "layers.{layer}.mlp.shared_experts.{mlp_proj}.kernel",
            "transpose"),
    KeyRule(_MLP + "gate.weight", "layers.{layer}.mlp.gate.kernel", "transpose"),
    KeyRule(_MLP + "gate.e_score_correction_bias", "layers.{layer}.mlp.gate.e_score_correction_bias"),
    KeyRule(_MLP + "experts.{expert}.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}", "expert"),
    KeyRule(_MLP + "experts.gate_up_proj", "layers.{layer}.mlp.gate_proj|up_proj", "fused_gate_up", save=False),
    KeyRule(_MLP + "experts.down_proj", "layers.{layer}.mlp.down_proj", "fused_down", save=False),
)
DEEPSEEK_V3_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def _decoder_tensors(files, config: DeepseekV3Config, block: tuple[int, int]):
    """The checkpoint's tensors as the model takes them: the MTP layers skipped (and noted once), and each FP8 weight
    with a ``weight_scale_inv`` companion read back dequantized (its scale consumed)."""
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")
    entries = {key: (file, handle) for file, key, handle in iter_tensors(files)}    # headers only
    skipped = set()
    for key, (file, handle) in entries.items():
        m = layer_of.match(key)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            skipped.add(int(m.group(1)))
            continue
        if key.endswith(_SCALE_SUFFIX) and key[:-len(_SCALE_SUFFIX)] + "weight" in entries:
            continue                                        # read with its weight
        scale = entries.get(key[:-len("weight")] + _SCALE_SUFFIX) if key.endswith(".weight") else None
        if scale is not None:
            handle = DequantizedWeight(handle, scale[1], block, scale[0])
        elif handle.dtype.startswith("F8"):
            raise CheckpointError(f"{os.path.basename(file)}: {key!r} is {handle.dtype} but the checkpoint has no "
                                  f"{key[:-len('weight')] + _SCALE_SUFFIX!r} to dequantize it with")
        yield file, key, handle
    if skipped:
        log.info("skipped the checkpoint's multi-token-prediction layer(s) %s (not part of the target's forward)",
                 sorted(skipped))


_SCALE_SUFFIX = "weight_scale_inv"


class DequantizedWeight:
    """A block-quantized weight ``[out, in]`` (FP8 e4m3 in DeepSeek's releases) read back as fp32:
    ``weight * weight_scale_inv`` per ``block`` tile (scale ``[ceil(out / b0), ceil(in / b1)]``)."""

    def __init__(self, weight, scale, block: tuple[int, int], scale_file: str):
        self.weight, self.scale, self.block = weight, scale, block
        shape, got = tuple(weight.shape), tuple(scale.shape)
        want = tuple(-(-n // b) for n, b in zip(shape, block)) if len(shape) == 2 else None
        if want is None or got != want:
            raise CheckpointError(
                f"{os.path.basename(scale_file)}: scale {scale.key!r} has shape {got} but weight {weight.key!r} "
                f"{shape} in {block[0]}x{block[1]} blocks needs {want if want else 'a 2-D weight'}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def read(self) -> np.ndarray:
        w = self.weight.read().astype(np.float32)
        s = self.scale.read().astype(np.float32)
        tiles = np.repeat(np.repeat(s, self.block[0], axis=0), self.block[1], axis=1)
        return w * tiles[:w.shape[0], :w.shape[1]]


def _quant_block(path: str) -> tuple[int, int]:
    """The dequantization tile of the checkpoint's ``quantization_config`` (DeepSeek's FP8 default 128 x 128)."""
    d, where = read_config_json(path)
    q = d.get("quantization_config")
    if q is None:
        return (128, 128)
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"{where}: quantization_config.quant_method={q.get('quant_method')!r} is not supported "
                          "(only DeepSeek's block-quantized 'fp8')")
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(f"{where}: quantization_config.weight_block_size={block!r} is not two positive integers")
    return tuple(block)


def load_deepseek_v3_target(path: str, dtype="float32", *, sharding: ShardingFn | None = None,
                            attention_impl: str = "auto") -> DeepseekV3ForCausalLM:
    """Loads a DeepSeek-V3-family checkpoint directory tensor by tensor, each placed straight onto ``sharding``; FP8
    block-quantized weights (the family's releases) are dequantized one at a time on the way."""
    config = DeepseekV3Config.from_json(path)
    dt = resolve_dtype(dtype)
    abstract = abstract_module(lambda rngs: DeepseekV3ForCausalLM(config, dtype=dt, attention_impl=attention_impl,
                                                                    rngs=rngs))
    graphdef, abs_state = nnx.split(abstract)
    values = read_state(abs_state, None, DEEPSEEK_V3_TARGET_RULES, DEEPSEEK_V3_IGNORED, dt, sharding,
                        skip_keys={"lm_head.weight"} if config.tie_word_embeddings else set(),
                        tensors=_decoder_tensors(checkpoint_files(path), config, _quant_block(path)))
    return nnx.merge(graphdef, fill_state(abs_state, values))


def deepseek_v3_to_torch_tensors(model: DeepseekV3ForCausalLM) -> dict:
    """The model's parameters under ``DeepseekV3ForCausalLM``'s released key names and layouts."""
    return export_tensors(nnx.state(model, nnx.Param), DEEPSEEK_V3_TARGET_RULES)


def save_deepseek_v3_target(model: DeepseekV3ForCausalLM, path: str, *, max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes ``config.json`` + safetensors as ``DeepseekV3ForCausalLM.save_pretrained`` does (no MTP layers)."""
    cfg = model.config.to_hf_dict() | {"dtype": dtype_name(model.dtype),
                                        "num_nextn_predict_layers": 0}      # this export carries no MTP layers
    return write_checkpoint_dir(path, deepseek_v3_to_torch_tensors(model), cfg, model.tokenizer,
                                max_shard_bytes=max_shard_bytes)
