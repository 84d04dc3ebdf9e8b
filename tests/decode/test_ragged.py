"""Ragged verification (issue 7 item 4): the flat layout, the target's flattened forward against its padded
forward, and the decode loop giving the same output with ragged and padded verification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.decode.ragged import flat_layout, ragged_buckets, verify_forward
from dspark_jax.decode.scheduler import PrefixScheduler
from dspark_jax.targets.base import TargetOutput

PROMPTS = [[3, 7, 1], [2, 2, 9, 4, 5], [11]]


def test_buckets():
    assert ragged_buckets(1, 8) == (1, 2, 4, 8)
    assert ragged_buckets(3, 5) == (3, 6, 12, 15)
    assert ragged_buckets(4, 1) == (4,)
    with pytest.raises(ValueError):
        ragged_buckets(0, 4)


@pytest.mark.parametrize("seed", range(5))
def test_flat_layout_matches_python(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, size=rng.integers(1, 7))
    capacity = int(counts.sum()) + int(rng.integers(0, 4))
    row, col = map(np.asarray, flat_layout(jnp.asarray(counts), capacity))
    want_row = [r for r, n in enumerate(counts) for _ in range(n)]
    want_col = [i for n in counts for i in range(n)]
    pad = capacity - len(want_row)
    np.testing.assert_array_equal(row, want_row + [-1] * pad)
    np.testing.assert_array_equal(col, want_col + [0] * pad)


def test_forward_flat_equals_padded_forward(jax_targets):
    """Rows with different cache lengths verify 1..W tokens; logits, taps and written keys match the padded path
    at every real token (fp32, <= 1e-5)."""
    target = jax_targets["moe"]
    rng = np.random.default_rng(0)
    b, w = 3, 5
    prompt_lens = jnp.asarray([4, 9, 6])
    prompts = jnp.asarray(rng.integers(0, 96, size=(b, 9)))
    # jitted with the (tiny) model closed over: eager op-by-op dispatch would dominate the test's time
    cache = jax.jit(lambda p, n: target(p, target.init_cache(b, 24), num_new=n, return_logits=False).cache)(
        prompts, prompt_lens)
    seq = jnp.asarray(rng.integers(0, 96, size=(b, w)))
    counts = jnp.asarray([1, 5, 3])
    taps = (0, 2)
    padded = jax.jit(lambda c: target(seq, c, num_new=counts, tap_layer_ids=taps))(cache)
    for buckets in (ragged_buckets(b, w),):        # 9 tokens run on the 12-slot bucket (3 padding slots)
        logits, tapped, new_cache = jax.jit(lambda c: verify_forward(target, seq, counts, c, taps, buckets))(cache)
        for r in range(b):
            n = int(counts[r])
            np.testing.assert_allclose(logits[r, :n], padded.logits[r, :n], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(tapped[r, :n], padded.taps[r, :n], atol=1e-5, rtol=1e-5)
            assert not np.asarray(logits[r, n:]).any()                       # unverified slots stay empty
            end = int(prompt_lens[r]) + n
            for layer in range(len(new_cache.keys)):
                np.testing.assert_allclose(new_cache.keys[layer][r, :end], padded.cache.keys[layer][r, :end],
                                           atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(new_cache.lengths, cache.lengths)


def test_forward_flat_bad_shapes(jax_targets):
    target = jax_targets["dense"]
    cache = target.init_cache(2, 8)
    with pytest.raises(ValueError, match="equal"):
        target.forward_flat(jnp.zeros((4,), jnp.int32), jnp.zeros((3,), jnp.int32), jnp.zeros((4,), jnp.int32), cache)


def test_verify_forward_runs_the_smallest_bucket(plain_target):
    """The switch runs the branch whose flat capacity is the smallest bucket >= the tokens verified: a stand-in
    target whose logits carry the flat length it was called with shows which branch ran."""
    seen = []

    class Stand:
        config = plain_target.config

        def forward_flat(self, input_ids, row, pos, cache, *, tap_layer_ids=(), layout=None):
            seen.append(input_ids.shape[0])
            t = input_ids.shape[0]
            return TargetOutput(logits=jnp.full((t, self.config.vocab_size), t, jnp.float32), taps=None,
                                last_hidden=jnp.zeros((t, self.config.hidden_size)), cache=cache)

    cache = plain_target.init_cache(2, 16)
    seq = jnp.zeros((2, 5), jnp.int32)
    for counts, want in (((1, 1), 2), ((2, 1), 4), ((3, 4), 8), ((5, 5), 10), ((0, 1), 2)):
        seen.clear()
        logits, _, _ = jax.jit(lambda c, cnt: verify_forward(Stand(), seq, cnt, c, (), ragged_buckets(2, 5)))(
            cache, jnp.asarray(counts))
        assert sorted(set(seen)) == list(ragged_buckets(2, 5))   # every branch is compiled (static shapes) ...
        assert float(logits[1, 0, 0]) == want                    # ... and the smallest one that fits is the one run
    # ... as zero-or-one-trip loops, not a switch: XLA:CPU copies every buffer through a conditional (the caches)
    text = jax.jit(lambda c, cnt: verify_forward(Stand(), seq, cnt, c, (), ragged_buckets(2, 5))).lower(
        cache, jnp.asarray((1, 1))).as_text()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text and "stablehlo.while" in text


@pytest.mark.parametrize("mode,temperature", [("threshold", 0.0), ("scheduler", 1.0)])
def test_ragged_and_padded_verification_agree(bigram_target, draft_factory, mode, temperature):
    """Same tokens, proposal and acceptance lengths with ragged and padded verification: greedy with a threshold
    (also == the target's own greedy decode) and sampled with Algorithm 1 for the same seed (the verdicts could only
    differ if fp32 logits computed in another order flipped a comparison, which these tiny models do not)."""
    draft = draft_factory(bigram_target, oracle_scale=0.7)
    kw = dict(threshold=0.6) if mode == "threshold" else dict(
        scheduler=PrefixScheduler(tuple(1000.0 / (1 + 0.15 * max(b - 1, 0)) for b in range(len(PROMPTS) * 5 + 1))))
    outs = [dj.speculative_generate(bigram_target, draft, PROMPTS, max_new_tokens=12, temperature=temperature,
                                    stop_token_ids=(), seed=3, ragged_verify=flag, **kw) for flag in (True, False)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].proposal_lengths, outs[1].proposal_lengths)
    np.testing.assert_array_equal(outs[0].accept_lengths, outs[1].accept_lengths)
    assert len(np.unique(outs[0].proposal_lengths)) >= 2                  # lengths really varied
    if temperature == 0.0:
        plain = dj.generate(bigram_target, PROMPTS, max_new_tokens=12, stop_token_ids=())
        np.testing.assert_array_equal(outs[0].tokens, plain.tokens)
