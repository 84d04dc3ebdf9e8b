"""Evaluation: DeepSpec prompt sets (datasets), acceptance metrics (metrics), the ``dspark eval`` runner (run)."""

from dspark_jax.decode.metrics import RoundCounts, round_counts, summarize
from dspark_jax.eval.datasets import DatasetError, load_prompts
from dspark_jax.eval.run import EvalSettings, evaluate

__all__ = ["DatasetError", "load_prompts", "RoundCounts", "round_counts", "summarize", "EvalSettings", "evaluate"]
