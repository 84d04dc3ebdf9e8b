"""Qwen3 grouped-query attention projections: q/k/v/o with per-head q_norm/k_norm.

Profile names (``jax.named_scope``): ``qkv`` (projections, norms, RoPE), ``attention`` (the kernel), ``o_proj``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.kernels._dispatch import resolve as resolve_impl
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
        with jax.named_scope("qkv"):
            q = self.q_proj(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)
            return apply_rope(self.q_norm(q), cos, sin)

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, H]`` -> (k, v) ``[B, T, nkv, hd]``; k normed and rotated, v raw."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        with jax.named_scope("qkv"):
            k = apply_rope(self.k_norm(self.k_proj(x).reshape(shape)), cos, sin)
            v = self.v_proj(x).reshape(shape)
        return k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attention then o_proj: ``q [B,S,nh,hd]``, ``k/v [B,T,nkv,hd]``, ``mask [B,S,T]`` -> ``[B,S,H]``."""
        with jax.named_scope("attention"):
            o = kernels.attention(q, k, v, mask, self.scale, impl=self.attention_impl)
        return self.project_out(o)

    def attend_ragged(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, row: jax.Array,
                      kv_len: jax.Array, layout: tuple[jax.Array, int] | None = None) -> jax.Array:
        """Ragged attention then o_proj: flattened query tokens ``q [T,nh,hd]`` of cache rows ``row [T]`` (-1 =
        padding) each see slots ``[0, kv_len[t])`` of ``k/v_cache [R,C,nkv,hd]`` -> ``[T,H]``.

        ``layout = (col [T], width)`` says where each token sits in a padded ``[R, width]`` block. With the XLA
        implementation the scores are then computed in that padded layout (batched matmuls over each row's cache)
        instead of gathering a cache row per token, which XLA executes as a copy of ``T x C`` keys; the Pallas
        kernel reads each token's row in place and needs no layout."""
        o = ragged_attend(q, k_cache, v_cache, row, kv_len, self.scale, self.attention_impl, layout)
        return self.project_out(o)

    def project_out(self, o: jax.Array) -> jax.Array:
        """Attention output ``[..., nh, hd]`` -> ``o_proj`` ``[..., H]``."""
        with jax.named_scope("o_proj"):
            return self.o_proj(o.reshape(*o.shape[:-2], self.num_heads * self.head_dim))


def ragged_attend(q, k_cache, v_cache, row, kv_len, scale, impl, layout=None, kv_start=None):
    """Ragged attention ``q [T,nh,hd]`` -> ``[T,nh,hd]`` over slots ``[kv_start, kv_len)`` (``kv_start`` None = 0;
    sliding-window layers pass their window start) of each token's cache row; ``layout`` as in
    :meth:`Attention.attend_ragged` (used by the XLA implementation only)."""
    kind, _ = resolve_impl(impl, "ragged_attention")
    with jax.named_scope("attention"):
        if kind == "xla" and layout is not None:
            return _ragged_via_padded(q, k_cache, v_cache, row, kv_len, layout, scale, kv_start)
        return kernels.ragged_attention(q, k_cache, v_cache, row, kv_len, scale, kv_start=kv_start, impl=impl)


def _ragged_via_padded(q, k_cache, v_cache, row, kv_len, layout, scale, kv_start=None):
    """Ragged attention computed as padded cache attention: scatter the tokens to ``[R, width]``, attend with a
    ``kv_start <= slot < kv_len`` mask, gather back (padding tokens get 0)."""
    col, width = layout
    r, c = k_cache.shape[:2]
    dst = jnp.where(row >= 0, row, r)
    qp = jnp.zeros((r, width) + q.shape[1:], q.dtype).at[dst, col].set(q, mode="drop")
    lens = jnp.zeros((r, width), jnp.int32).at[dst, col].set(kv_len.astype(jnp.int32), mode="drop")
    slots = jnp.arange(c)[None, None, :]
    mask = slots < lens[:, :, None]
    if kv_start is not None:
        starts = jnp.zeros((r, width), jnp.int32).at[dst, col].set(kv_start.astype(jnp.int32), mode="drop")
        mask = mask & (slots >= starts[:, :, None])
    o = kernels.attention_reference(qp, k_cache, v_cache, mask, scale)
    return jnp.where((row >= 0)[:, None, None], o[jnp.maximum(row, 0), col], 0).astype(q.dtype)
