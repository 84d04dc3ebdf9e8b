"""Target model families; each exposes tapped hidden states and a KV cache."""

from dspark_jax.targets.qwen3 import Qwen3ForCausalLM, TargetOutput, build_target

__all__ = ["Qwen3ForCausalLM", "TargetOutput", "build_target"]
