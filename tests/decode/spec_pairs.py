"""Target/draft pairs for decode tests (imported by conftest and tests).

``bigram`` is a target whose next-token distribution depends only on the current token (attention and MLP
outputs zeroed, so the residual stream is the token's embedding). A DSpark draft can then represent it
exactly with its Markov head (W1 = identity, W2 = the target's bigram logit table, backbone output zeroed):
``p_d == p_t``, so every draft is accepted. Scaling W2 makes a near-oracle; a random draft rejects nearly all.
"""

import jax.numpy as jnp
import numpy as np

import dspark_jax as dj
from dspark_jax.config import TargetConfig

V = 16
MASK = V - 1


def _target(seed=0, bigram=False, layers=4):
    t = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8, initializer_range=0.5), seed=seed)
    if bigram:
        for layer in t.layers:
            layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
            layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    return t


def bigram_table(target) -> np.ndarray:
    """``[V, V]`` logits: row = current token."""
    ids = jnp.arange(V)[:, None]
    return np.asarray(target(ids).logits[:, 0], np.float64)


def make_draft(target, kind="vanilla", rank=V, confidence=True, seed=1, oracle_scale=None):
    cfg = dj.DraftConfig(block_size=4, mask_token_id=MASK, target_layer_ids=(0, 1, 2), num_anchors=4,
                         markov_rank=rank if kind else 0, markov_head_type=kind or "vanilla",
                         enable_confidence_head=confidence, num_draft_layers=2)
    draft = dj.build_draft(target, cfg, seed=seed)
    if oracle_scale is not None:
        table = bigram_table(target)
        draft.norm.weight[...] = jnp.zeros_like(draft.norm.weight[...])        # backbone contributes nothing
        draft.markov_head.markov_w1[...] = jnp.eye(V, rank, dtype=jnp.float32)
        w2 = np.zeros((V, rank), np.float32)
        w2[:, :V] = oracle_scale * table.T
        draft.markov_head.markov_w2[...] = jnp.asarray(w2)
        if kind == "gated":  # gate = sigmoid(bias): make it ~1 so the bias passes through
            draft.markov_head.gate_proj.kernel[...] = jnp.zeros_like(draft.markov_head.gate_proj.kernel[...])
            draft.markov_head.gate_proj.bias[...] = jnp.full_like(draft.markov_head.gate_proj.bias[...], 30.0)
    return draft


