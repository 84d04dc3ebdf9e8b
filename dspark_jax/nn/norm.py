"""RMSNorm with transformers' Qwen3 numerics: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``weight * (x_f32 * rsqrt(mean(x_f32**2) + eps)).astype(x.dtype)`` over the last axis."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return normed if weight is None else weight * normed


class RMSNorm(nnx.Module):
    """``[..., dim] -> [..., dim]``; the learnable scale is named ``weight`` as in transformers."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32, axis_name: str | None = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
