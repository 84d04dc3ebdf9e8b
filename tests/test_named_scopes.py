"""Profile names: the model's main blocks are traced under ``jax.named_scope`` names (``qkv``, ``attention``,
``o_proj``, ``mlp``, ``moe_router``, ``moe_experts``, ``lm_head``, ``markov_head``, ``verify``, ...), so XLA op
names and profiles read in model terms. These tests lower tiny forwards and look for the names in the lowered
module's op locations, so a refactor cannot drop them silently; and they check that the scopes are metadata only:
the lowered math is the same with ``jax.named_scope`` replaced by a no-op.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.config import TargetConfig
from dspark_jax.decode.sampling import SamplingConfig
from dspark_jax.decode.verify import verify_block
from dspark_jax.drafts.backbone import DraftLayer
from dspark_jax.drafts.heads import ConfidenceHead, MarkovHead
from dspark_jax.targets import build_target
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config
from dspark_jax.targets.gemma4_config import Gemma4Config

V, H = 32, 16
LAYER_SCOPES = {"qkv", "attention", "o_proj"}


def _qwen3_moe_config() -> TargetConfig:
    # layer 0 dense (mlp_only_layers), layer 1 MoE
    return TargetConfig(model_type="qwen3_moe", vocab_size=V, hidden_size=H, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=(0,),
                        tie_word_embeddings=False)


def _deepseek_config() -> DeepseekV3Config:
    return DeepseekV3Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
                            v_head_dim=8, q_lora_rank=8, moe_intermediate_size=8, n_routed_experts=4,
                            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)


def _gemma4_config() -> Gemma4Config:
    return Gemma4Config(vocab_size=V, hidden_size=H, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                        sliding_window=4, hidden_size_per_layer_input=4, vocab_size_per_layer_input=V,
                        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=8,
                        final_logit_softcapping=5.0)


def _lower(fn, *args):
    return jax.jit(fn).lower(*args)


def _scopes(lowered) -> set[str]:
    """The scopes in the ops' name paths: ``loc("jit(f)/moe_router/top_k"...)`` -> {moe_router} (the jit and the
    op name left out; argument and file locations are not name paths)."""
    names = re.findall(r'loc\("(jit\([^"]*)"', lowered.as_text(debug_info=True))
    return {part for name in names for part in name.split("/")[1:-1]}


def _target_forward(model):
    """(fn, state): ``fn(state, ids)`` runs the model's cache-less forward with logits, as a pure function."""
    graphdef, state = nnx.split(model)

    def fn(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    return fn, state


def _target_flat(model):
    """(fn, state): ``fn(state, ids, row, pos)`` is ``forward_flat`` over a fresh one-row cache."""
    graphdef, state = nnx.split(model)

    def fn(state, ids, row, pos):
        m = nnx.merge(graphdef, state)
        return m.forward_flat(ids, row, pos, m.init_cache(1, 8)).logits

    return fn, state


IDS = jnp.arange(6, dtype=jnp.int32)[None] % V
FLAT = (jnp.arange(4, dtype=jnp.int32), jnp.zeros((4,), jnp.int32), jnp.arange(4, dtype=jnp.int32))

TARGETS = {
    "qwen3_moe": (_qwen3_moe_config, LAYER_SCOPES | {"embed", "mlp", "moe_router", "moe_experts", "lm_head"}),
    "deepseek_v3": (_deepseek_config, LAYER_SCOPES | {"embed", "mlp", "moe_router", "moe_experts", "moe_shared",
                                                      "lm_head"}),
    "gemma4": (_gemma4_config, LAYER_SCOPES | {"embed", "per_layer_inputs", "mlp", "moe_router", "moe_experts",
                                               "lm_head"}),
}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_target_forward_scopes(family):
    make_config, expected = TARGETS[family]
    fn, state = _target_forward(build_target(make_config(), dtype="float32", seed=0))
    missing = expected - _scopes(_lower(fn, state, IDS))
    assert not missing, f"{family}: scopes missing from the lowered forward: {sorted(missing)}"


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_target_flat_verification_scopes(family):
    """The decode loop's ragged verification forward (the ``ragged_attend`` path) keeps the names too."""
    make_config, _ = TARGETS[family]
    fn, state = _target_flat(build_target(make_config(), dtype="float32", seed=0))
    missing = (LAYER_SCOPES | {"embed", "lm_head"}) - _scopes(_lower(fn, state, *FLAT))
    assert not missing, f"{family}: scopes missing from forward_flat: {sorted(missing)}"


def test_draft_pieces_and_verify_scopes():
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    layer_def, layer_state = nnx.split(DraftLayer(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                                  rngs=nnx.Rngs(0)))
    heads_def, heads_state = nnx.split((MarkovHead(V, H, 4, "rnn", rngs=nnx.Rngs(1)),
                                        ConfidenceHead(H, 4, True, rngs=nnx.Rngs(2))))
    b, q, c = 1, 4, 6
    rope = (jnp.ones((b, q, 8)), jnp.zeros((b, q, 8)))
    ctx_rope = (jnp.ones((b, c, 8)), jnp.zeros((b, c, 8)))
    mask = jnp.ones((b, q, c + q), bool)

    def draft(layer_state, heads_state, h, ctx, prev):
        layer = nnx.merge(layer_def, layer_state)
        markov, confidence = nnx.merge(heads_def, heads_state)
        h, _ = layer(h, rope, ctx, ctx_rope, mask)
        u = markov.teacher_forced(h, prev)
        return markov.bias(u), confidence(h, markov.prev_embedding(prev))

    lowered = _lower(draft, layer_state, heads_state, jnp.ones((b, q, H)), jnp.ones((b, c, H)),
                     jnp.zeros((b, q), jnp.int32))
    missing = (LAYER_SCOPES | {"mlp", "markov_head", "confidence_head"}) - _scopes(lowered)
    assert not missing, f"scopes missing from the draft layer / heads: {sorted(missing)}"

    for sampling in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)):
        def verify(tokens, d_logits, t_logits, lengths, key):
            return verify_block(tokens, d_logits, t_logits, lengths, key, sampling)

        lowered = _lower(verify, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4, V)), jnp.zeros((2, 5, V)),
                         jnp.full((2,), 4, jnp.int32), jax.random.key(0))
        assert "verify" in _scopes(lowered), f"verify_block at {sampling} lost its scope"


def test_scopes_do_not_change_the_math(monkeypatch):
    """Same lowered module (op locations left out) and same jaxpr with every ``jax.named_scope`` a no-op, and the
    same logits."""
    model = build_target(_qwen3_moe_config(), dtype="float32", seed=0)

    def lowered_and_jaxpr():
        fn, state = _target_forward(model)       # a fresh function: no trace cache shared between the two runs
        return _lower(fn, state, IDS).as_text(), str(jax.make_jaxpr(fn)(state, IDS)), jax.jit(fn)(state, IDS)

    text, jaxpr, logits = lowered_and_jaxpr()
    monkeypatch.setattr(jax, "named_scope", lambda name: contextlib.nullcontext())
    plain_text, plain_jaxpr, plain_logits = lowered_and_jaxpr()
    assert text == plain_text
    assert jaxpr == plain_jaxpr
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))
