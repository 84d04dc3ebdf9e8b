"""Continuous batching for speculative decoding (decode/spec_slots.py): with refills mid-run, greedy output equals
the target's greedy output for every draft kind (threshold and schedulers on), every request's tokens and round
records equal the static loop's at any temperature (per-request keys), cache bookkeeping holds per request, and
sampled tokens follow the target distribution."""

import numpy as np
import pytest
from spec_pairs import V, _target, make_draft
from test_scheduler import _schedulers
from test_speculative import _check_round_invariants, _chi_square_pvalue, _first_tokens_distribution

import dspark_jax as dj
from dspark_jax.decode.sampling import SamplingConfig

STOP = 5


@pytest.fixture(scope="module")
def target():
    return _target(seed=0, layers=6)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, V - 1, rng.integers(1, 12)).tolist() for _ in range(9)]


def _eagle3(target):
    return dj.build_draft(target, dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4),
                                                 num_draft_layers=1, ttt_length=3), seed=1)


@pytest.mark.parametrize("kind,temperature", [("dspark", 1.0), ("dflash", 0.0), ("eagle3", 1.0)])
def test_refilled_slots_equal_the_static_loop(target, prompts, kind, temperature):
    draft = {"dspark": lambda: make_draft(target), "dflash": lambda: make_draft(target, kind=None),
             "eagle3": lambda: _eagle3(target)}[kind]()
    kw = dict(max_new_tokens=14, temperature=temperature, seed=3, stop_token_ids=[STOP])
    static = dj.speculative_generate(target, draft, prompts, **kw)
    slots = dj.speculative_generate(target, draft, prompts, max_slots=3, refill_at=1, **kw)
    assert slots.token_lists() == static.token_lists()
    rounds = slots.accept_lengths.shape[1]
    np.testing.assert_array_equal(slots.accept_lengths, static.accept_lengths[:, :rounds])
    np.testing.assert_array_equal(slots.proposal_lengths, static.proposal_lengths[:, :rounds])
    assert slots.stats["tau"] == static.stats["tau"] and slots.stats["prompt_passes"] > 1
    assert len(set(slots.lengths.tolist())) >= 2, "uneven lengths, so slots are refilled mid-run"
    _check_round_invariants(slots, 14, 3 if kind == "eagle3" else 4)
    if temperature == 0:
        assert slots.token_lists() == dj.generate(target, prompts, **kw).token_lists()


@pytest.mark.parametrize("name", ["threshold", "prefix", "zos"])
def test_greedy_with_threshold_or_scheduler_over_slots(target, prompts, name):
    """The threshold / scheduler sees the live slots as its batch (ragged verification at 4 slots). With the
    zero-overhead scheduler the drain policy also packs the last requests into fewer slots (rows, caches and the
    scheduler's ring buffers gathered)."""
    draft = make_draft(target, rank=4)
    kw = dict(max_new_tokens=16, stop_token_ids=[STOP], max_slots=4, refill_at=1, shrink=name == "zos")
    if name == "threshold":
        kw["threshold"] = 0.5
    else:
        kw["scheduler"] = _schedulers(4)[name]
    out = dj.speculative_generate(target, draft, prompts, **kw)
    assert out.token_lists() == dj.generate(target, prompts, max_new_tokens=16, stop_token_ids=[STOP]).token_lists()
    _check_round_invariants(out, 16, 4)
    props = out.proposal_lengths[out.accept_lengths > 0]
    assert props.min() < 4, "the threshold / scheduler never shortened a proposal"


def test_lossless_first_two_tokens_with_refills(target):
    """Chi-square (level 1e-3) of the first 2 tokens (a prompt pass, then a draft-verify round) of 2000 requests
    through 32 slots, refilled as they finish."""
    draft = make_draft(target, rank=4)
    prompt = [3, 7, 1]
    out = dj.speculative_generate(target, draft, [prompt] * 2000, max_new_tokens=2, temperature=1.0,
                                  stop_token_ids=(), seed=6, max_slots=32, refill_at=8)
    assert (out.lengths == 2).all() and out.stats["prompt_passes"] > 40
    assert _chi_square_pvalue(out.tokens[:, :2], _first_tokens_distribution(target, prompt, 2,
                                                                             SamplingConfig(1.0))) > 1e-3


def test_a_request_alone_equals_it_among_others(target, prompts):
    draft = make_draft(target)
    kw = dict(max_new_tokens=16, temperature=1.0, seed=2, stop_token_ids=[STOP])
    among = dj.speculative_generate(target, draft, prompts, max_slots=4, **kw).token_lists()
    alone = dj.speculative_generate(target, draft, [prompts[5]], request_ids=[5], **kw).token_lists()[0]
    assert alone == among[5]
