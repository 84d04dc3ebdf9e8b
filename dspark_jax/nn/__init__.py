"""Building blocks shared by targets and drafts."""

from dspark_jax.nn.attention import Attention
from dspark_jax.nn.mlp import SwiGLU
from dspark_jax.nn.moe import MoE
from dspark_jax.nn.norm import RMSNorm, rms_norm
from dspark_jax.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["RMSNorm", "rms_norm", "apply_rope", "rope_cos_sin", "rope_inv_freq", "SwiGLU", "MoE", "Attention"]
