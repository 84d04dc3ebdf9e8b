"""Target model families; each exposes tapped hidden states and a KV cache."""

from dspark_jax.targets.gemma4 import Gemma4ForCausalLM
from dspark_jax.targets.gemma4_config import Gemma4Config
from dspark_jax.targets.qwen3 import Qwen3ForCausalLM, TargetOutput, build_target

__all__ = ["Qwen3ForCausalLM", "Gemma4ForCausalLM", "Gemma4Config", "TargetOutput", "build_target"]
