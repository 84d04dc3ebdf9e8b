"""Rotary position embeddings (transformers' rotate-half layout), computed in fp32."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Returns ``(inv_freq [head_dim//2] float32, attention_scaling)`` as transformers computes them."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.rope_theta) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    scaling = 1.0
    kind = rope.rope_type
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = (inv_freq / np.float32(rope.factor)).astype(np.float32)
    elif kind == "yarn":
        inv_freq, scaling = _yarn(rope, dim, pos_freqs, max_position_embeddings)
    elif kind == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    else:  # config validation rejects others
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv_freq.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int, pos_freqs: np.ndarray, max_pos: int):
    base = rope.rope_theta
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_pos / orig

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq.astype(np.float32), attention_factor


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    factor = rope.factor
    low_ff = rope.low_freq_factor if rope.low_freq_factor is not None else 1.0
    high_ff = rope.high_freq_factor if rope.high_freq_factor is not None else 4.0
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray | jax.Array, scaling: float = 1.0):
    """``positions [...]`` -> ``(cos, sin)`` each ``[..., head_dim]`` in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, S, heads, hd]``, ``cos/sin [B, S, hd]`` (fp32) -> rotated x in x's dtype.

    cos/sin are cast to x's dtype first, as transformers does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
