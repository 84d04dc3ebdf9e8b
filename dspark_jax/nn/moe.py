"""Sparse mixture of experts (Qwen3-MoE): softmax router, top-k, optional renormalisation, SwiGLU
experts computed as grouped matmuls over tokens sorted by expert (``jax.lax.ragged_dot``).

Expert weights are stacked on a leading ``experts`` axis so that axis can be sharded (expert
parallelism) by the logical-axis rules. Profile names: ``moe_router``, ``moe_experts``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.nn.linear import linear


class MoE(nnx.Module):
    """``[B, S, H] -> [B, S, H]``.

    Params: ``router.kernel [H, E]``; ``gate_proj/up_proj [E, H, I]``; ``down_proj [E, I, H]``.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, norm_topk_prob: bool,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.dtype = dtype
        self.router = linear(hidden, num_experts, ("embed", None), dtype=dtype, param_dtype=param_dtype,
                             init_std=init_std, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        self.gate_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, intermediate), param_dtype),
                                   logical_axes=("experts", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, intermediate), param_dtype),
                                 logical_axes=("experts", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, intermediate, hidden), param_dtype),
                                   logical_axes=("experts", "mlp", "embed"))

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [T, H]`` -> (weights ``[T, k]`` in x's dtype, expert ids ``[T, k]`` int32)."""
        with jax.named_scope("moe_router"):
            logits = self.router(x)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            top_p, top_idx = jax.lax.top_k(probs, self.top_k)
            if self.norm_topk_prob:
                top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
            return top_p.astype(logits.dtype), top_idx.astype(jnp.int32)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, hidden = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, hidden).astype(self.dtype)
        weights, expert_ids = self.route(tokens)
        out = grouped_experts(tokens, expert_ids, weights, self.gate_proj[...].astype(self.dtype),
                              self.up_proj[...].astype(self.dtype), self.down_proj[...].astype(self.dtype))
        return out.reshape(*lead, hidden)

    def dense_reference(self, x: jax.Array) -> jax.Array:
        """Every expert on every token, combined with the routing weights (a test oracle)."""
        lead, hidden = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, hidden).astype(self.dtype)
        weights, expert_ids = self.route(tokens)
        h = jax.nn.silu(jnp.einsum("th,ehi->tei", tokens, self.gate_proj[...])) * jnp.einsum(
            "th,ehi->tei", tokens, self.up_proj[...])
        all_out = jnp.einsum("tei,eih->teh", h, self.down_proj[...])
        combine = jnp.sum(jax.nn.one_hot(expert_ids, self.num_experts, dtype=weights.dtype) * weights[..., None], 1)
        return jnp.einsum("teh,te->th", all_out, combine).reshape(*lead, hidden)


def grouped_experts(tokens: jax.Array, expert_ids: jax.Array, weights: jax.Array, gate: jax.Array,
                    up: jax.Array, down: jax.Array) -> jax.Array:
    """SwiGLU experts over token copies sorted by expert.

    Args:
      tokens: ``[T, H]``; expert_ids, weights: ``[T, k]``; gate/up ``[E, H, I]``; down ``[E, I, H]``.
    Returns:
      ``[T, H]`` = sum over the k chosen experts of ``weight * expert(token)``.
    """
    num_tokens, k = expert_ids.shape
    num_experts = gate.shape[0]
    with jax.named_scope("moe_experts"):
        flat_ids = expert_ids.reshape(-1)
        order = jnp.argsort(flat_ids, stable=True)
        sorted_tokens = jnp.take(tokens, order // k, axis=0)
        group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
        h = jax.nn.silu(jax.lax.ragged_dot(sorted_tokens, gate, group_sizes)) * jax.lax.ragged_dot(
            sorted_tokens, up, group_sizes)
        sorted_out = jax.lax.ragged_dot(h.astype(tokens.dtype), down, group_sizes)
        per_copy = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(num_tokens, k, -1)
        return jnp.sum(per_copy * weights[..., None], axis=1).astype(tokens.dtype)
