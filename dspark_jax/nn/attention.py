"""Qwen3 grouped-query attention projections: q/k/v/o with per-head q_norm/k_norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.nn.linear import linear
from dspark_jax.nn.norm import RMSNorm
from dspark_jax.nn.rope import apply_rope


class Attention(nnx.Module):
    """Projections and output of one attention layer. The caller owns positions, caches and masks, so
    the same module serves causal targets and drafts that inject extra context keys/values."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, eps: float = 1e-6,
                 bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.attention_impl = attention_impl
        mk = lambda i, o, axes: linear(i, o, axes, bias=bias, dtype=dtype, param_dtype=param_dtype,
                                       init_std=init_std, rngs=rngs)
        self.q_proj = mk(hidden, num_heads * head_dim, ("embed", "heads"))
        self.k_proj = mk(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.v_proj = mk(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.o_proj = mk(num_heads * head_dim, hidden, ("heads", "embed"))
        self.q_norm = RMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)
        self.k_norm = RMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """``x [B, S, H]`` -> q ``[B, S, nh, hd]`` normed and rotated."""
        q = self.q_proj(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)
        return apply_rope(self.q_norm(q), cos, sin)

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, H]`` -> (k, v) ``[B, T, nkv, hd]``; k normed and rotated, v raw."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(shape)), cos, sin)
        v = self.v_proj(x).reshape(shape)
        return k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attention then o_proj: ``q [B,S,nh,hd]``, ``k/v [B,T,nkv,hd]``, ``mask [B,S,T]`` -> ``[B,S,H]``."""
        o = kernels.attention(q, k, v, mask, self.scale, impl=self.attention_impl)
        return self.o_proj(o.reshape(*o.shape[:2], self.num_heads * self.head_dim))
