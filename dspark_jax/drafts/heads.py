"""DSpark's sequential heads (spec §1.6-1.7): the Markov head (vanilla / gated / rnn) and the confidence head.

Every Markov variant produces a rank-``r`` vector ``u`` per slot; the logit bias is ``u @ markov_w2.T``
(``[.., V]``). Keeping ``u`` (not the bias) lets losses and samplers work on vocab chunks.

Profile names (``jax.named_scope``): ``markov_head``, ``confidence_head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.nn.linear import linear


class MarkovHead(nnx.Module):
    """Params: ``markov_w1 [V, r]`` (prev-token embedding), ``markov_w2 [V, r]`` (Linear r->V, torch layout);
    gated adds ``gate_proj`` (H+r -> r, bias); rnn adds ``joint_proj`` (2r+H -> 3r, bias)."""

    def __init__(self, vocab: int, hidden: int, rank: int, kind: str = "vanilla", *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        if kind not in ("vanilla", "gated", "rnn"):
            raise ValueError(f"markov_head_type {kind!r} is not one of vanilla, gated, rnn")
        self.kind, self.rank, self.dtype = kind, rank, dtype
        init = nnx.initializers.normal(init_std)
        self.markov_w1 = nnx.Param(init(rngs.params(), (vocab, rank), param_dtype), logical_axes=("vocab", None))
        self.markov_w2 = nnx.Param(init(rngs.params(), (vocab, rank), param_dtype), logical_axes=("vocab", None))
        if kind == "gated":
            self.gate_proj = linear(hidden + rank, rank, ("embed", None), bias=True, dtype=dtype,
                                    param_dtype=param_dtype, init_std=init_std, rngs=rngs)
        if kind == "rnn":
            self.joint_proj = linear(2 * rank + hidden, 3 * rank, ("embed", None), bias=True, dtype=dtype,
                                     param_dtype=param_dtype, init_std=init_std, rngs=rngs)

    def prev_embedding(self, prev: jax.Array) -> jax.Array:
        """``W1[prev]``: ``[...]`` ids -> ``[..., r]``."""
        with jax.named_scope("markov_head"):
            return self._prev_embedding(prev)

    def step(self, hidden: jax.Array, prev: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One slot: ``hidden [B, H]``, ``prev [B]``, ``state [B, r]`` (rnn only) -> (u ``[B, r]``, new state)."""
        with jax.named_scope("markov_head"):
            return self._step(hidden, prev, state)

    # the unscoped bodies: the public methods call each other's work without nesting markov_head/markov_head
    def _prev_embedding(self, prev: jax.Array) -> jax.Array:
        return jnp.take(self.markov_w1[...], prev, axis=0).astype(self.dtype)

    def _step(self, hidden: jax.Array, prev: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        e = self._prev_embedding(prev)
        if self.kind == "vanilla":
            return e, state
        if self.kind == "gated":
            gate = jax.nn.sigmoid(self.gate_proj(jnp.concatenate([hidden.astype(self.dtype), e], -1)))
            return gate * e, state
        z = self.joint_proj(jnp.concatenate([state.astype(self.dtype), e, hidden.astype(self.dtype)], -1))
        g, c, o = jnp.split(z, 3, axis=-1)
        sg = jax.nn.sigmoid(g)
        new_state = sg * state + (1 - sg) * jnp.tanh(c)
        return jnp.tanh(o), new_state

    def teacher_forced(self, hidden: jax.Array, prev: jax.Array) -> jax.Array:
        """All slots at once with ground-truth prev tokens: ``hidden [..., Bs, H]``, ``prev [..., Bs]`` ->
        u ``[..., Bs, r]`` (the rnn recurrence is unrolled over the block axis)."""
        with jax.named_scope("markov_head"):
            if self.kind != "rnn":
                u, _ = self._step(hidden, prev, jnp.zeros(prev.shape + (self.rank,), self.dtype))
                return u
            lead = prev.shape[:-1]
            h_k = jnp.moveaxis(hidden, -2, 0)
            p_k = jnp.moveaxis(prev, -1, 0)

            def body(state, xs):
                h, p = xs
                u, state = self._step(h, p, state)
                return state, u

            _, us = jax.lax.scan(body, jnp.zeros(lead + (self.rank,), self.dtype), (h_k, p_k))
            return jnp.moveaxis(us, 0, -2)

    def bias(self, u: jax.Array) -> jax.Array:
        """``u [..., r]`` -> logit bias ``[..., V]``."""
        with jax.named_scope("markov_head"):
            return jnp.einsum("...r,vr->...v", u, self.markov_w2[...].astype(self.dtype))


class ConfidenceHead(nnx.Module):
    """``conf_logit = proj([hidden ; W1[prev]])`` (or ``proj(hidden)`` without the Markov input); fp32 out."""

    def __init__(self, hidden: int, rank: int, with_markov: bool, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.with_markov = with_markov
        self.proj = linear(hidden + (rank if with_markov else 0), 1, ("embed", None), bias=True, dtype=dtype,
                           param_dtype=param_dtype, init_std=init_std, rngs=rngs)

    def __call__(self, hidden: jax.Array, prev_embedding: jax.Array | None) -> jax.Array:
        """``hidden [..., H]``, ``prev_embedding [..., r]`` -> ``[...]`` fp32 logits (sigmoid = confidence)."""
        with jax.named_scope("confidence_head"):
            x = hidden if not self.with_markov else jnp.concatenate([hidden, prev_embedding.astype(hidden.dtype)], -1)
            return self.proj(x)[..., 0].astype(jnp.float32)
