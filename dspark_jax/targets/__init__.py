"""Target model families; each exposes tapped hidden states and a KV cache (see ``base.py`` for the contract and
``registry.py`` for the families by ``model_type``)."""

from dspark_jax.targets.base import TargetOutput
from dspark_jax.targets.deepseek_v3 import DeepseekV3ForCausalLM
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config
from dspark_jax.targets.gemma4 import Gemma4ForCausalLM
from dspark_jax.targets.gemma4_config import Gemma4Config
from dspark_jax.targets.qwen3 import Qwen3ForCausalLM
from dspark_jax.targets.registry import build_target

__all__ = ["Qwen3ForCausalLM", "Gemma4ForCausalLM", "Gemma4Config", "DeepseekV3ForCausalLM", "DeepseekV3Config",
           "TargetOutput", "build_target"]
