"""Building blocks against references: MoE grouped matmul vs dense, RoPE vs transformers, RMSNorm, attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.config import RopeConfig
from dspark_jax.kernels import attention_reference
from dspark_jax.nn import MoE, rms_norm, rope_inv_freq


@pytest.mark.parametrize("norm_topk", [False, True])
def test_moe_grouped_matches_dense_reference(norm_topk):
    moe = MoE(16, 12, num_experts=5, top_k=2, norm_topk_prob=norm_topk, init_std=0.3, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (3, 7, 16))
    np.testing.assert_allclose(np.asarray(moe(x)), np.asarray(moe.dense_reference(x)), atol=1e-5, rtol=1e-5)
    # gradients flow through the grouped path like through the dense one
    g1 = jax.grad(lambda x: jnp.sum(moe(x) ** 2))(x)
    g2 = jax.grad(lambda x: jnp.sum(moe.dense_reference(x) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-4, rtol=1e-4)


def test_moe_handles_experts_with_no_tokens():
    moe = MoE(8, 4, num_experts=16, top_k=1, norm_topk_prob=False, init_std=0.3, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (1, 2, 8))  # 2 tokens, 16 experts: most get nothing
    np.testing.assert_allclose(np.asarray(moe(x)), np.asarray(moe.dense_reference(x)), atol=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_inv_freq_matches_transformers(rope):
    pytest.importorskip("torch", reason="compares against transformers' rope functions")
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=32768,
                         rope_parameters=dict(rope))
    kind = rope["rope_type"]
    if kind == "default":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        ref, ref_scale = Qwen3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    ours, scale = rope_inv_freq(RopeConfig(**rope), 32, 32768)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert scale == pytest.approx(float(ref_scale))


def test_rms_norm_matches_formula():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3
    w = jnp.linspace(0.5, 1.5, 8)
    ref = w * x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(rms_norm(x, w, 1e-6)), ref, rtol=1e-5)


def test_attention_gqa_and_fully_masked_rows():
    q = jax.random.normal(jax.random.key(0), (1, 3, 4, 8))
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 5, 2, 8))
    mask = jnp.array([[[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]], bool)
    out = attention_reference(q, k, v, mask, 8 ** -0.5)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)  # a fully masked query gives exactly 0
    # reference: repeat kv heads and do plain softmax attention per head
    kr, vr = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), kr) * 8 ** -0.5
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)[:, :, :2]  # rows with at least one visible key
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", p, vr)
    np.testing.assert_allclose(np.asarray(out[0, :2]), ref[0], atol=1e-5)
