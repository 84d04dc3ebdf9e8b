"""Shared test set-up: 8 fake CPU devices, a persistent compilation cache, tiny HF reference models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get("DSPARK_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _tiny_hf(kind: str):
    """(transformers config, model class) of the tiny reference models used across the suite."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=96, max_position_embeddings=512, rms_norm_eps=1e-6, attention_dropout=0.0)
    if kind == "dense":
        cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
                          initializer_range=0.2, **common)
        return cfg, Qwen3ForCausalLM
    if kind == "odd":
        # head_dim != hidden/heads, one KV head, tied embeddings, attention bias, yarn rope
        cfg = Qwen3Config(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, attention_bias=True,
                          initializer_range=0.2,
                          rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                           "original_max_position_embeddings": 128}, **common)
        return cfg, Qwen3ForCausalLM
    if kind == "moe":
        # a dense layer (mlp_only_layers) among MoE layers, renormalised top-k
        cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                             decoder_sparse_step=1, tie_word_embeddings=False, initializer_range=0.2, **common)
        return cfg, Qwen3MoeForCausalLM
    raise KeyError(kind)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> (checkpoint dir, transformers model in eval mode, fp32). Built once per session."""
    torch = pytest.importorskip("torch", reason="torch (test extra) builds the reference models")
    out = {}
    for i, kind in enumerate(("dense", "odd", "moe")):
        torch.manual_seed(1234 + i)
        cfg, cls = _tiny_hf(kind)
        model = cls(cfg).eval()
        path = tmp_path_factory.mktemp(f"hf_{kind}")
        model.save_pretrained(path)
        out[kind] = (str(path), model)
    return out


@pytest.fixture(scope="session")
def jax_targets(hf_models):
    """kind -> our target loaded from the same checkpoint (fp32)."""
    import dspark_jax as dj

    return {kind: dj.load_target(path) for kind, (path, _) in hf_models.items()}


@pytest.fixture
def rng():
    return np.random.default_rng(0)
