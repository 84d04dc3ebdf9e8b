"""Shape-only construction (``nn.abstract``): the abstract model a checkpoint is read into, and the one a dry run
sizes, built with ``ShapeOnlyRngs`` are the models ``nnx.Rngs`` builds, leaf for leaf (path, shape, dtype, logical
axes), for every target family and draft class."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dspark_jax.config import TargetConfig
from dspark_jax.drafts.build import draft_class
from dspark_jax.drafts.config import EAGLE3_ARCH, DraftConfig
from dspark_jax.drafts.gemma4 import bind_gemma4
from dspark_jax.nn.abstract import ShapeOnlyRngs, abstract_module
from dspark_jax.targets import build_target
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config
from dspark_jax.targets.gemma4_config import Gemma4Config

TARGETS = {
    "qwen3_moe": lambda: TargetConfig(
        model_type="qwen3_moe", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, mlp_only_layers=(1,), tie_word_embeddings=False),
    "deepseek_v3": lambda: DeepseekV3Config(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=6, num_attention_heads=2,
        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, q_lora_rank=8,
        moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1),
    "gemma4": lambda: Gemma4Config(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, sliding_window=4, hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=40, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=8),
}


def _leaves(module) -> list:
    """(path, shape, dtype, metadata) of every variable, in order."""
    out = []
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            out.append((path, type(var).__name__, value.shape, value.dtype, var.get_metadata().get("logical_axes")))
    return out


def _same_as_with_rngs(build):
    abstract = abstract_module(build)
    reference = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    got, want = _leaves(abstract), _leaves(reference)
    assert got and got == want
    assert nnx.graphdef(abstract) == nnx.graphdef(reference)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    return abstract


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_abstract_targets_and_drafts_equal_what_nnx_rngs_builds(family):
    tcfg = TARGETS[family]()
    target = _same_as_with_rngs(lambda rngs: build_target(tcfg, dtype="bfloat16", rngs=rngs))
    kinds = [DraftConfig(block_size=4, mask_token_id=39, target_layer_ids=(0, 2), num_anchors=4, markov_rank=4,
                         num_draft_layers=1),
             DraftConfig(architecture=EAGLE3_ARCH, target_layer_ids=(0, 1, 2, 3, 4), num_draft_layers=1, markov_rank=0,
                         enable_confidence_head=False)]
    for config in kinds:
        bound = bind_gemma4(config, target.config) if family == "gemma4" else config.bind(target.config)
        _same_as_with_rngs(lambda rngs: draft_class(bound)(bound, dtype=jnp.float32, rngs=rngs))


def test_every_stream_draws_one_fixed_key_and_private_names_are_not_streams():
    rngs = ShapeOnlyRngs()
    assert rngs.params() is rngs.default() is rngs()
    with pytest.raises(AttributeError):
        rngs._missing
