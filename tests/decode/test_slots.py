"""Continuous batching for plain decoding (decode/slots.py): with refills mid-run, every request's tokens equal the
static batch's (greedy and sampled: per-request keys), do not depend on the slot count or on the other requests,
arrive through the streaming form as they finish, and sampled tokens follow the target's distribution."""

import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.config import TargetConfig
from dspark_jax.decode.sampling import SamplingConfig
from dspark_jax.decode.slots import PlainSlotEngine, SlotStats, stream_generate

V = 64
EOS = 3


@pytest.fixture(scope="module")
def target():
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.5,
                       eos_token_id=EOS)
    return dj.build_target(cfg, seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(4, V, rng.integers(1, 20)).tolist() for _ in range(11)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refilled_slots_equal_the_static_batch(target, prompts, temperature):
    kw = dict(max_new_tokens=24, temperature=temperature, top_k=20 if temperature else 0, seed=5)
    static = dj.generate(target, prompts, **kw)
    lengths = static.lengths
    assert lengths.min() < 24 < lengths.max() + 1 and len(set(lengths.tolist())) > 2, lengths  # uneven: refills
    util = {}
    for slots, refill_at, shrink in ((3, 1, False), (4, 2, False), (4, 2, True)):
        out = dj.generate(target, prompts, max_slots=slots, refill_at=refill_at, shrink=shrink, **kw)
        assert out.token_lists() == static.token_lists(), (slots, refill_at, shrink)
        assert out.stats["prompt_passes"] > 1 and out.stats["slots"] == slots
        util[slots, shrink] = out.stats["slot_utilisation"]
        assert 0 < util[slots, shrink] <= 1
    if temperature:   # the drain policy packed the last requests into fewer slots (greedy: they all end together)
        assert util[4, True] > util[4, False]
    streamed = list(dj.generate_stream(target, prompts, max_slots=2, refill_at=1, **kw))
    assert sorted(i for i, _ in streamed) == list(range(len(prompts)))
    assert dict(streamed) == dict(enumerate(static.token_lists()))


def test_a_request_alone_equals_it_among_others(target, prompts):
    kw = dict(max_new_tokens=16, temperature=1.0, seed=9)
    among = dj.generate(target, prompts, max_slots=4, **kw).token_lists()
    for i in (0, 6):
        alone = dj.generate(target, [prompts[i]], request_ids=[i], **kw).token_lists()[0]
        assert alone == among[i]
    shuffled = dj.generate(target, prompts[::-1], request_ids=list(range(len(prompts)))[::-1], max_slots=3,
                           **kw).token_lists()[::-1]
    assert shuffled == among


def test_stream_reports_what_it_did(target, prompts):
    stats = SlotStats()
    rows = [p for p in prompts]
    got = dict(stream_generate(target, rows, max_new_tokens=8, sampling=SamplingConfig(), stop_ids=(),
                               seed=0, max_slots=4, refill_at=1, stats=stats))
    assert all(len(t) == 8 for t in got.values())       # no stop token: every request runs to max_new_tokens
    # 11 requests x 7 decode-step tokens each (the first comes from the prompt pass)
    assert stats.busy_slot_steps == 11 * 7
    assert stats.slot_steps == 4 * stats.decode_steps and stats.utilisation > 0.5
    assert stats.seconds > 0 and stats.syncs >= 3


def test_second_token_follows_the_target_distribution_with_refills(target):
    """Chi-square at significance 1e-3: the marginal of the second token over 3000 requests that pass through 8
    slots (each refilled ~375 times) against sum_t1 p(t1 | prompt) p(t2 | prompt, t1) computed exactly."""
    from scipy import stats

    prompt, temperature, n = [7, 30, 12], 1.3, 3000
    out = dj.generate(target, [prompt] * n, max_new_tokens=2, temperature=temperature, seed=2, stop_token_ids=(),
                      max_slots=8, refill_at=2)
    p1 = _softmax(np.asarray(target(jnp.asarray([prompt])).logits[0, -1], np.float64) / temperature)
    both = jnp.asarray([prompt + [t] for t in range(V)])
    p2_given = _softmax(np.asarray(target(both).logits[:, -1], np.float64) / temperature)
    p2 = p1 @ p2_given
    counts = np.bincount(out.tokens[:, 1], minlength=V)
    big = p2 * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p2[big] * n, p2[~big].sum() * n)
    keep = exp > 0
    assert stats.chisquare(obs[keep], exp[keep]).pvalue > 1e-3


def test_requests_submitted_while_running_join_the_queue(target, prompts):
    """A multi-turn job: each finished request submits its follow-up (prompt + output + a new user token) while
    the engine runs (``followups``: the loop hands back as slots free up even with an empty queue); every turn
    equals generating that turn's prompt directly."""
    kw = dict(max_new_tokens=6, temperature=1.0, seed=4)
    engine = PlainSlotEngine(target, num_slots=3, max_prompt_len=64, max_new_tokens=6,
                             sampling=SamplingConfig(1.0), stop_ids=(EOS,), seed=4, refill_at=1)
    for i, p in enumerate(prompts[:5]):
        engine.submit(100 * i, p, tag=(i, 0, p))
    turns = {}
    for (i, turn, prompt), toks in engine.run(followups=True):
        turns[i, turn] = (prompt, toks.tolist())
        if turn < 2:
            follow = prompt + toks.tolist() + [10 + turn]
            engine.submit(100 * i + turn + 1, follow, tag=(i, turn + 1, follow))
    assert len(turns) == 15 and not engine.busy
    for (i, turn), (prompt, toks) in turns.items():
        direct = dj.generate(target, [prompt], request_ids=[100 * i + turn], stop_token_ids=[EOS], **kw)
        assert direct.token_lists()[0] == toks, (i, turn)
    with pytest.raises(ValueError, match="prompt of 65 tokens"):
        engine.submit(0, [1] * 65)


def test_bad_slot_arguments_are_clear_errors(target, prompts):
    with pytest.raises(ValueError, match="max_slots"):
        dj.generate(target, prompts, max_new_tokens=2, max_slots=0)
    with pytest.raises(ValueError, match="refill_at"):
        dj.generate(target, prompts, max_new_tokens=2, max_slots=2, refill_at=0)
    with pytest.raises(ValueError, match="request_ids"):
        dj.generate(target, prompts, max_new_tokens=2, request_ids=[1, 2])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
