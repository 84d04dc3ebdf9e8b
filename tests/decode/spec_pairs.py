"""Target/draft pairs for decode tests (imported by conftest and tests). See dspark_jax.testing."""

import dspark_jax as dj
from dspark_jax.config import TargetConfig
from dspark_jax.testing import make_bigram, make_oracle_draft

V = 16
MASK = V - 1


def _target(seed=0, bigram=False, layers=4):
    t = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8, initializer_range=0.5), seed=seed)
    return make_bigram(t) if bigram else t


def make_draft(target, kind="vanilla", rank=V, confidence=True, seed=1, oracle_scale=None):
    cfg = dj.DraftConfig(block_size=4, mask_token_id=MASK, target_layer_ids=(0, 1, 2), num_anchors=4,
                         markov_rank=rank if kind else 0, markov_head_type=kind or "vanilla",
                         enable_confidence_head=confidence, num_draft_layers=2)
    draft = dj.build_draft(target, cfg, seed=seed)
    return draft if oracle_scale is None else make_oracle_draft(target, draft, oracle_scale)
