"""Constructed target/draft pairs with known acceptance, for tests and benchmarks (not for training).

``make_bigram`` turns a target into one whose next-token distribution depends only on the current token
(attention and MLP outputs zeroed, so the residual stream is the token's embedding; compute is unchanged).
``make_oracle_draft`` then sets a DSpark draft's Markov head to that bigram table (W1 = identity rows,
W2 = scale * table, backbone output zeroed): at scale 1 and temperature 1, ``p_d == p_t`` exactly, so
every draft is accepted; a large scale gives a greedy oracle; scale < 1 a near miss.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_bigram(target):
    """Zeroes every layer's o_proj and down_proj in place; returns the target."""
    for layer in target.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        mlp = layer.mlp
        if hasattr(mlp, "down_proj") and hasattr(mlp.down_proj, "kernel"):
            mlp.down_proj.kernel[...] = jnp.zeros_like(mlp.down_proj.kernel[...])
        else:
            mlp.down_proj[...] = jnp.zeros_like(mlp.down_proj[...])
    return target


def bigram_table(target) -> np.ndarray:
    """``[V, V]`` logits of a bigram target (row = current token)."""
    v = target.config.vocab_size
    return np.asarray(target(jnp.arange(v)[:, None]).logits[:, 0], np.float64)


def make_oracle_draft(target, draft, scale: float = 1.0):
    """Writes the target's bigram table into the draft's Markov head (rank must be >= V); returns the draft."""
    v = target.config.vocab_size
    head = draft.markov_head
    if head is None or head.rank < v:
        raise ValueError(f"an oracle draft needs a Markov head of rank >= V={v}")
    draft.norm.weight[...] = jnp.zeros_like(draft.norm.weight[...])
    head.markov_w1[...] = jnp.eye(v, head.rank, dtype=head.markov_w1[...].dtype)
    w2 = np.zeros((v, head.rank), np.float32)
    w2[:, :v] = scale * bigram_table(target).T
    head.markov_w2[...] = jnp.asarray(w2, head.markov_w2[...].dtype)
    if head.kind == "gated":  # sigmoid(30) ~ 1: the gate passes the prev embedding through
        head.gate_proj.kernel[...] = jnp.zeros_like(head.gate_proj.kernel[...])
        head.gate_proj.bias[...] = jnp.full_like(head.gate_proj.bias[...], 30.0)
    return draft
