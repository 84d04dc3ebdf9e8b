"""Ragged verification with a Gemma4 target: ``forward_flat`` (sliding-window starts, K/V-sharing layers, per-layer
inputs, MoE, softcapped logits) against the padded forward, and the decode loop giving the target's greedy output
with ragged and padded verification.

Target: V=32, H=16, 5 layers (sliding / full, window 4) of which the last 2 reuse earlier layers' K/V, nh 2,
sliding nkv/hd 1/8, full nkv/hd 1/16 with ``attention_k_eq_v``, per-layer inputs, softcap 5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.decode.ragged import ragged_buckets, verify_forward
from dspark_jax.decode.scheduler import PrefixScheduler
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.targets.gemma4_config import Gemma4Config

V, WINDOW, MASK = 32, 4, 31
LAYERS = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention")
TOL = dict(atol=1e-5, rtol=1e-5)


def target_config(**changes) -> Gemma4Config:
    kw = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, layer_types=LAYERS, sliding_window=WINDOW, final_logit_softcapping=5.0,
              hidden_size_per_layer_input=4, vocab_size_per_layer_input=V, initializer_range=0.5,
              num_kv_shared_layers=2, eos_token_id=None)
    kw.update(changes)
    return Gemma4Config(**kw)


@pytest.fixture(scope="module")
def target():
    return dj.build_target(target_config(), seed=0)


def test_forward_flat_equals_padded_forward():
    """Rows whose caches are past the sliding window verify 1..W tokens (9 tokens on the 12-slot bucket): logits,
    taps and written keys/values match the padded forward at every real token (fp32, <= 1e-5). The MoE branch is
    on so every Gemma4 layer part runs through the flat path."""
    target = dj.build_target(target_config(enable_moe_block=True, num_experts=4, top_k_experts=2,
                                           moe_intermediate_size=8), seed=1)
    assert target.config.kv_sharing_modes[3:] == ("reuse", "reuse")
    rng = np.random.default_rng(0)
    b, w = 3, 5
    prompt_lens = jnp.asarray([6, 11, 8])                        # all > WINDOW: the window start matters
    prompts = jnp.asarray(rng.integers(0, V, size=(b, 11)))
    # jitted with the (tiny) model closed over: eager op-by-op dispatch would dominate the test's time
    cache = jax.jit(lambda p, n: target(p, target.init_cache(b, 20), num_new=n, return_logits=False).cache)(
        prompts, prompt_lens)
    seq = jnp.asarray(rng.integers(0, V, size=(b, w)))
    counts = jnp.asarray([1, 5, 3])
    taps = (-1, 0, 3)
    padded = jax.jit(lambda c: target(seq, c, num_new=counts, tap_layer_ids=taps))(cache)
    logits, tapped, new_cache = jax.jit(lambda c: verify_forward(target, seq, counts, c, taps,
                                                                 ragged_buckets(b, w)))(cache)
    assert float(jnp.max(jnp.abs(logits))) <= 5.0                 # softcapped
    for r in range(b):
        n = int(counts[r])
        np.testing.assert_allclose(logits[r, :n], padded.logits[r, :n], **TOL)
        np.testing.assert_allclose(tapped[r, :n], padded.taps[r, :n], **TOL)
        assert not np.asarray(logits[r, n:]).any()
        end = int(prompt_lens[r]) + n
        for layer in range(len(new_cache.keys)):
            assert new_cache.keys[layer].shape == padded.cache.keys[layer].shape
            np.testing.assert_allclose(new_cache.keys[layer][r, :end], padded.cache.keys[layer][r, :end], **TOL)
            np.testing.assert_allclose(new_cache.values[layer][r, :end], padded.cache.values[layer][r, :end], **TOL)
    np.testing.assert_array_equal(new_cache.lengths, cache.lengths)


def test_forward_flat_sees_only_the_window(target):
    """A sliding layer's flat attention ignores keys older than the window: changing a token more than WINDOW
    positions back changes nothing through a sliding-only stack (full layers would see it)."""
    t = dj.build_target(target_config(num_hidden_layers=2, layer_types=("sliding_attention",) * 2,
                                      num_kv_shared_layers=0), seed=2)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, V, size=(1, 10)))
    run = jax.jit(lambda p: t.forward_flat(jnp.asarray([5]), jnp.asarray([0]), jnp.asarray([10]),
                                           t(p, t.init_cache(1, 12), return_logits=False).cache).logits)
    # the query at position 10 sees positions 7..10 of layer 1, which saw 4..10 of layer 0's input
    changed = prompt.at[0, 3].set((prompt[0, 3] + 1) % V)
    np.testing.assert_array_equal(run(prompt), run(changed))
    assert not np.array_equal(run(prompt), run(prompt.at[0, 4].set((prompt[0, 4] + 1) % V)))


def test_ragged_and_padded_verification_agree(target):
    """Greedy with a Gemma4 DSpark draft under a prefix scheduler: ragged and padded verification give the same
    tokens, proposal and acceptance lengths, equal to the target's own greedy decode. (The threshold rule is covered
    by tests/drafts/test_gemma4_draft.py, whose threshold 0.5 case now verifies ragged by default.)"""
    draft = dj.build_draft(target, DraftConfig(block_size=4, mask_token_id=MASK, target_layer_ids=(0, 1, 2),
                                               num_anchors=3, num_draft_layers=2, markov_rank=4,
                                               markov_head_type="vanilla", enable_confidence_head=True,
                                               dtype="float32"), seed=3)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 1, 30]]
    kw = dict(scheduler=PrefixScheduler(tuple(1000.0 / (1 + 0.15 * max(n - 1, 0)) for n in range(2 * 4 + 1))))
    want = dj.generate(target, prompts, max_new_tokens=20, temperature=0.0, stop_token_ids=())
    outs = [dj.speculative_generate(target, draft, prompts, max_new_tokens=20, temperature=0.0, stop_token_ids=(),
                                    ragged_verify=flag, **kw) for flag in (True, False)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].proposal_lengths, outs[1].proposal_lengths)
    np.testing.assert_array_equal(outs[0].accept_lengths, outs[1].accept_lengths)
    np.testing.assert_array_equal(outs[0].tokens, want.tokens)
    assert len(np.unique(outs[0].proposal_lengths)) >= 2              # lengths really varied
