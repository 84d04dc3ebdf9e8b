"""Session fixtures for the draft tests: the tiny config of spec §7 (fp32).

Target: V=32, H=16, nh/nkv/hd 2/1/8, I=32, 4 layers. Draft: taps [0,1,2], D=2, Bs=4, N=3, r=4, mask id 31.
``initializer_range`` is 0.5 (not 0.02) so that logits, Markov biases and confidence logits are O(1): with
the HF default every head contributes ~1e-3 and a wrong prev token or position would hide under the
tolerances.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.config import TargetConfig
from dspark_jax.drafts.build import build_draft
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.targets import build_target

V, H, BS, N_ANCHORS, RANK, MASK_ID = 32, 16, 4, 3, 4, 31
TAP_IDS = (0, 1, 2)
INIT_STD = 0.5
DRAFT_KINDS = ("vanilla", "gated", "rnn", "dflash")


def tiny_target_config(**changes) -> TargetConfig:
    kw = dict(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=INIT_STD)
    kw.update(changes)
    return TargetConfig(**kw)


def tiny_draft_config(kind: str = "vanilla", **changes) -> DraftConfig:
    kw = dict(block_size=BS, mask_token_id=MASK_ID, target_layer_ids=TAP_IDS, num_anchors=N_ANCHORS,
              num_draft_layers=2, markov_rank=RANK, markov_head_type="vanilla", enable_confidence_head=True,
              dtype="float32")
    if kind == "dflash":
        kw.update(markov_rank=0, enable_confidence_head=False)
    else:
        kw.update(markov_head_type=kind)
    kw.update(changes)
    return DraftConfig(**kw)


@pytest.fixture(scope="session")
def tiny_target():
    return build_target(tiny_target_config(), dtype="float32", seed=0)


@pytest.fixture(scope="session")
def drafts(tiny_target):
    """kind -> draft (vanilla / gated / rnn DSpark, and DFlash). Shared: tests must not mutate them."""
    return {kind: build_draft(tiny_target, tiny_draft_config(kind), seed=10 + i)
            for i, kind in enumerate(DRAFT_KINDS)}


@nnx.jit
def _run_target(target, ids):
    out = target(ids, tap_layer_ids=TAP_IDS)
    return out.taps, out.last_hidden, out.logits


@pytest.fixture(scope="session")
def run_target():
    """(target, ids) -> (taps, last_hidden, logits), jitted (the taps are those of ``TAP_IDS``)."""
    return _run_target


@pytest.fixture(scope="session")
def batch(tiny_target):
    """A B=2, S=12 training batch: ids, loss_mask (row 1 has a gap), taps [2,12,48], last_hidden [2,12,16], and
    the target's own logits [2,12,32]."""
    ids = jnp.asarray(np.random.default_rng(7).integers(0, MASK_ID, (2, 12)), jnp.int32)
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                           [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]], jnp.int32)
    taps, last_hidden, logits = _run_target(tiny_target, ids)
    return dict(input_ids=ids, loss_mask=loss_mask, target_hidden=taps, target_last_hidden=last_hidden,
                logits=logits)


@pytest.fixture(scope="session")
def anchors_keep():
    """Ascending anchors for the batch above (row 0: one near the end; row 1: a dummy block)."""
    anchors = jnp.array([[1, 5, 10], [2, 6, 0]], jnp.int32)
    keep = jnp.array([[True, True, True], [True, True, False]])
    return anchors, keep


@pytest.fixture(scope="session")
def tiny_configs():
    """(tiny_target_config, tiny_draft_config) builders, for tests that need fresh or altered models."""
    return tiny_target_config, tiny_draft_config
