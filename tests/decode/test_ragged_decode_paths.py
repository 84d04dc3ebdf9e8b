"""Issue 8 item 2: the decode loop's attention goes through the ragged kernel dispatch for both models.

* The draft's inference block attention: with the Pallas kernel (CPU interpret mode here) the block's keys are
  written into the cache after the context and the kernel reads each row in place; with XLA the attention is a
  two-part softmax over (cache, block) that never concatenates them. Both equal the old dense ``[cache ; block]``
  formula.
* ``dj.generate``: with Pallas the decode step is ``target.forward_flat`` (one token per row); Qwen3 and Gemma4
  (sliding-window starts) give the same greedy tokens as the XLA path.
* ``dj.speculative_generate`` with every attention on the Pallas kernels still equals target greedy decoding.

Models: the decode pairs of spec_pairs.py (V=16, H=16, nh/nkv/hd 2/1/8, 4 target layers, D=2, Bs=4) and a tiny
Gemma4 target (5 layers, sliding window 4, K/V sharing, per-layer inputs). Everything is fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from spec_pairs import MASK, make_draft

import dspark_jax as dj
from dspark_jax import kernels
from dspark_jax.decode import autoregressive
from dspark_jax.drafts.backbone import cached_block_attention_reference, inference_mask
from dspark_jax.drafts.config import BONUS_ANCHOR
from dspark_jax.kernels import attention_reference
from dspark_jax.targets.gemma4_config import Gemma4Config

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 3]]
TOL = dict(atol=2e-5, rtol=0)


@pytest.fixture(autouse=True)
def _no_env_impl(monkeypatch):
    # the models below pick their implementation explicitly; a suite-wide override must not flip the XLA side
    monkeypatch.delenv("DSPARK_KERNEL_IMPL", raising=False)


def with_impl(model, impl: str):
    """A copy of ``model`` whose attention layers all use ``impl``."""
    out = nnx.clone(model)
    for _, sub in nnx.iter_modules(out):
        if hasattr(sub, "attention_impl"):
            sub.attention_impl = impl
    return out


def gemma4_config(**changes) -> Gemma4Config:
    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, sliding_window=4, final_logit_softcapping=5.0, hidden_size_per_layer_input=4,
              vocab_size_per_layer_input=32, initializer_range=0.5, num_kv_shared_layers=2, eos_token_id=None,
              layer_types=("sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                           "full_attention"))
    kw.update(changes)
    return Gemma4Config(**kw)


# ---- the XLA two-part attention == the old concatenation -------------------------------------------------------
@pytest.mark.parametrize("nh,nkv", [(4, 2), (3, 1)])
def test_two_part_attention_equals_concat(nh, nkv):
    """``[cache ; block]`` concatenated under ``inference_mask`` (the old formula) vs the two-part softmax, with an
    empty row, a full row and large scores (the shared max must be the joint one): fp32 within 1e-6."""
    rng = np.random.default_rng(0)
    b, cap, q, hd = 3, 11, 5, 8
    qs = jnp.asarray(rng.normal(size=(b, q, nh, hd)) * 3, jnp.float32)
    kc, vc = (jnp.asarray(rng.normal(size=(b, cap, nkv, hd)), jnp.float32) for _ in range(2))
    kb, vb = (jnp.asarray(rng.normal(size=(b, q, nkv, hd)), jnp.float32) for _ in range(2))
    ctx_len = jnp.asarray([0, 7, cap], jnp.int32)
    old = attention_reference(qs, jnp.concatenate([kc, kb], 1), jnp.concatenate([vc, vb], 1),
                              inference_mask(ctx_len, cap, q), 0.7)
    new = jax.jit(cached_block_attention_reference, static_argnums=6)(qs, kc, vc, ctx_len, kb, vb, 0.7)
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), atol=1e-6, rtol=0)


# ---- draft inference: Pallas (block keys in the cache) == XLA ---------------------------------------------------
def _pair(plain_target, kind):
    """(target, draft) for ``kind``: a DSpark draft, a bonus-anchor DSpark draft, or a Gemma4 DSpark draft."""
    if kind == "gemma4":
        target = dj.build_target(gemma4_config(), seed=0)
        cfg = dj.DraftConfig(block_size=4, mask_token_id=31, target_layer_ids=(0, 1, 2), num_anchors=3,
                             markov_rank=4, num_draft_layers=2, enable_confidence_head=True)
        return target, dj.build_draft(target, cfg, seed=1)
    if kind == "bonus":
        cfg = dj.DraftConfig(block_size=4, mask_token_id=MASK, target_layer_ids=(0, 1, 2), num_anchors=4,
                             markov_rank=4, num_draft_layers=2, slot_convention=BONUS_ANCHOR)
        return plain_target, dj.build_draft(plain_target, cfg, seed=2)
    return plain_target, make_draft(plain_target, rank=4)


def _two_rounds(draft, taps, counts1, counts2, anchors, cap):
    """Round 1 ingests ``counts1`` rows of ``taps``; round 2 proposes (greedy) with ``counts2`` pending rows.
    -> (block hidden of both rounds, proposal tokens / logits, the final cache)."""
    graph, state = nnx.split(draft)

    @jax.jit
    def run(state, taps, counts1, counts2, anchors):
        d = nnx.merge(graph, state)
        h1, cache = d.block_hidden(d.init_cache(taps.shape[0], cap), taps, counts1, anchors[0])
        prop = d.propose(cache, taps[:, 3:3 + d.config.block_size + 1], counts2, anchors[1], jax.random.key(0),
                         dj.SamplingConfig(0.0))
        return h1, prop.block_hidden, prop.tokens, prop.logits, prop.cache

    return run(state, taps, counts1, counts2, anchors)


@pytest.mark.parametrize("kind,interpret", [("dspark", "tpu"), ("dspark", "gpu"), ("bonus", "tpu"),
                                            ("gemma4", "tpu")])
def test_draft_block_attention_pallas_equals_xla(plain_target, kind, interpret, monkeypatch):
    """Rows with different cache lengths and pending counts (one row with none pending in round 2): block hidden
    states, greedy proposals, their logits and the cache contents up to the length match (fp32, <= 2e-5)."""
    monkeypatch.setenv("DSPARK_PALLAS_INTERPRET", interpret)
    target, draft = _pair(plain_target, kind)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 15, size=(3, 9)), jnp.int32)
    taps = target(ids, tap_layer_ids=draft.config.target_layer_ids).taps
    counts1, counts2 = jnp.asarray([2, 9, 5], jnp.int32), jnp.asarray([3, 0, 5], jnp.int32)
    anchors = jnp.asarray(rng.integers(0, 15, size=(2, 3)), jnp.int32)
    cap = 10 + draft.config.num_block_slots      # tight: row 2's second block ends exactly at the capacity
    calls = []
    real = kernels.ragged_attention
    monkeypatch.setattr(kernels, "ragged_attention", lambda *a, **k: calls.append(k["impl"]) or real(*a, **k))
    xla = _two_rounds(with_impl(draft, "xla"), taps, counts1, counts2, anchors, cap)
    assert not calls                                       # the XLA path never builds a ragged call
    pal = _two_rounds(with_impl(draft, "pallas"), taps, counts1, counts2, anchors, cap)
    assert calls == ["pallas"] * (2 * draft.config.num_draft_layers)
    for a, b in zip(pal[:4], xla[:4]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    np.testing.assert_array_equal(pal[2], xla[2])
    c_pal, c_xla = pal[4], xla[4]
    np.testing.assert_array_equal(c_pal.lengths, counts1 + counts2)
    np.testing.assert_array_equal(c_xla.lengths, counts1 + counts2)
    for layer in range(len(c_pal.keys)):
        for r, n in enumerate(np.asarray(c_pal.lengths)):
            np.testing.assert_allclose(c_pal.keys[layer][r, :n], c_xla.keys[layer][r, :n], **TOL)
            np.testing.assert_allclose(c_pal.values[layer][r, :n], c_xla.values[layer][r, :n], **TOL)


def test_pallas_block_needs_room_in_the_cache(plain_target):
    """Outside jit the Pallas path checks that the block's keys fit after the context."""
    draft = with_impl(make_draft(plain_target, rank=4), "pallas")
    taps = jnp.zeros((1, 6, 3 * 16), jnp.float32)
    with pytest.raises(ValueError, match="no room for the block"):
        draft.block_hidden(draft.init_cache(1, 8), taps, jnp.asarray([6]), jnp.asarray([1]))


# ---- dj.generate: flat decode step == dense decode step --------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_generate_pallas_equals_xla(plain_target, family):
    """Greedy tokens of the flat (ragged-kernel) decode step == the dense-mask step. Gemma4: prompts and outputs
    run past the sliding window (4), so the window start of the flat path matters."""
    target = plain_target if family == "qwen3" else dj.build_target(gemma4_config(), seed=0)
    prompts = PROMPTS if family == "qwen3" else [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    xla, pal = with_impl(target, "xla"), with_impl(target, "pallas")
    assert not autoregressive._decodes_flat(xla) and autoregressive._decodes_flat(pal)
    ref = dj.generate(xla, prompts, max_new_tokens=10, stop_token_ids=())
    out = dj.generate(pal, prompts, max_new_tokens=10, stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_generate_env_override_reaches_the_decode_step(plain_target, monkeypatch):
    """``$DSPARK_KERNEL_IMPL`` is read per call (outside jit): an ``auto`` target flips to the flat step."""
    assert not autoregressive._decodes_flat(plain_target)
    monkeypatch.setenv("DSPARK_KERNEL_IMPL", "pallas")
    assert autoregressive._decodes_flat(plain_target)


# ---- speculative decoding with every attention on the Pallas kernels ------------------------------------------
@pytest.mark.parametrize("case", ["oracle", "random_ragged"])
def test_speculative_pallas_equals_target_greedy(plain_target, bigram_target, case):
    """Greedy speculative decoding with the draft and target on Pallas == target greedy decoding. The oracle draft
    accepts whole blocks, so rows reach the end of the cache (the block's keys must still fit); the random draft
    with a threshold runs the ragged verify."""
    if case == "oracle":
        target = bigram_target
        draft = make_draft(target, oracle_scale=50.0)
        kw = dict(max_new_tokens=13)
    else:
        target = plain_target
        draft = make_draft(target, rank=4)
        kw = dict(max_new_tokens=12, threshold=0.5, ragged_verify=True)
    ref = dj.generate(with_impl(target, "xla"), PROMPTS, max_new_tokens=kw["max_new_tokens"], stop_token_ids=())
    out = dj.speculative_generate(with_impl(target, "pallas"), with_impl(draft, "pallas"), PROMPTS,
                                  stop_token_ids=(), **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    if case == "oracle":
        assert out.stats["tau"] > 4.0
