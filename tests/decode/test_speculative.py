"""dj.speculative_generate: greedy equivalence (spec §8.1), losslessness (§8.2), bounds (§8.3), cache
invariants (§8.12), bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from spec_pairs import V

import dspark_jax as dj
from dspark_jax.decode import spec_loop as spec_mod
from dspark_jax.decode.sampling import SamplingConfig, categorical, warp_logits
from dspark_jax.decode.speculative import _spec_jit
from dspark_jax.decode.verify import verify_block

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 3]]


def _check_round_invariants(out, max_new, block_size):
    """Spec §8.3 bounds and §8.12 cache bookkeeping, per row."""
    acc, prop = out.accept_lengths, out.proposal_lengths
    assert ((acc >= 0) & (acc <= block_size + 1)).all()
    assert ((prop >= 0) & (prop <= block_size)).all()
    had = acc > 0
    assert (acc[had] - 1 <= prop[had]).all(), "accepted more drafts than proposed"
    inv = out.stats["_invariants"]
    # target cache length == start; draft cache + pending rows == start; start = prompt + committed - 1
    np.testing.assert_array_equal(inv["draft_len"] + inv["pending"], inv["target_len"])
    committed = acc.sum(axis=1) + 1                        # + the token sampled at prefill
    np.testing.assert_array_equal(inv["target_len"], inv["prompt_len"] + committed - 1)
    assert (np.minimum(committed, max_new) == out.lengths).all()
    assert 1.0 <= out.stats["tau"] <= block_size + 1


@pytest.mark.parametrize("kind,threshold", [("vanilla", 0.0), ("vanilla", 0.5), ("gated", 0.0), ("rnn", 0.5),
                                            (None, 0.0)])
def test_greedy_equals_target_greedy_random_draft(plain_target, draft_factory, kind, threshold):
    draft = draft_factory(plain_target, kind=kind, rank=4, confidence=kind is not None)
    ref = dj.generate(plain_target, PROMPTS, max_new_tokens=24, stop_token_ids=())
    out = dj.speculative_generate(plain_target, draft, PROMPTS, max_new_tokens=24, threshold=threshold,
                                  stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    _check_round_invariants(out, 24, 4)


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_greedy_equals_target_greedy_oracle_draft(bigram_target, draft_factory, kind):
    """A draft that predicts the target exactly: every block is accepted, tau = Bs + 1."""
    draft = draft_factory(bigram_target, kind=kind, oracle_scale=50.0)
    ref = dj.generate(bigram_target, PROMPTS, max_new_tokens=21, stop_token_ids=())
    out = dj.speculative_generate(bigram_target, draft, PROMPTS, max_new_tokens=21, stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    _check_round_invariants(out, 21, 4)
    if kind != "rnn":  # the rnn head's bias goes through tanh(o), not the identity embedding
        assert out.stats["tau"] == 5.0 and out.stats["accept_rate@3"] == 1.0


def test_stop_tokens_end_rows_like_plain_generation(bigram_target, draft_factory):
    draft = draft_factory(bigram_target, oracle_scale=50.0)
    free = dj.generate(bigram_target, PROMPTS, max_new_tokens=20, stop_token_ids=())
    stop = int(free.tokens[1, 6])
    ref = dj.generate(bigram_target, PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    out = dj.speculative_generate(bigram_target, draft, PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_verify_accepts_everything_when_draft_equals_target():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 5, V)) * 2, jnp.float32)
    cfg = SamplingConfig(temperature=1.0)
    toks = jax.random.categorical(jax.random.key(0), logits[:, :4], axis=-1)
    v = verify_block(toks, logits[:, :4], logits, jnp.full((64,), 4), jax.random.key(1), cfg)
    assert (np.asarray(v.num_accepted) == 4).all()


def test_greedy_verify_shortcut_equals_the_general_rule():
    """At temperature 0 verify_block skips the one-hot probability tensors; its verdict must be the general
    rule's on every row: drafts that match the target argmax for a while, then differ; all proposal lengths."""
    from dspark_jax.decode.verify import verify_block_general

    rng = np.random.default_rng(3)
    b, bs = 256, 5
    t_logits = jnp.asarray(rng.normal(size=(b, bs + 1, V)), jnp.float32)
    d_logits = jnp.asarray(rng.normal(size=(b, bs, V)), jnp.float32)
    t_arg = np.asarray(jnp.argmax(t_logits, -1))
    agree = rng.integers(0, bs + 1, b)                      # rows agree with the target for a random prefix
    toks = np.where(np.arange(bs)[None, :] < agree[:, None], t_arg[:, :bs], (t_arg[:, :bs] + 1) % V)
    # draft logits whose argmax is the drafted token (greedy drafts are argmaxes of their own logits)
    d_logits = d_logits.at[np.arange(b)[:, None], np.arange(bs)[None, :], toks].add(100.0)
    lengths = jnp.asarray(rng.integers(0, bs + 1, b), jnp.int32)
    cfg = SamplingConfig(temperature=0.0)
    fast = verify_block(jnp.asarray(toks), d_logits, t_logits, lengths, jax.random.key(0), cfg)
    ref = verify_block_general(jnp.asarray(toks), d_logits, t_logits, lengths, jax.random.key(0), cfg)
    np.testing.assert_array_equal(fast.num_accepted, ref.num_accepted)
    np.testing.assert_array_equal(fast.next_token, ref.next_token)
    np.testing.assert_array_equal(fast.accepted, ref.accepted)
    assert 0 < int(np.sum(np.asarray(fast.num_accepted) == np.asarray(lengths))) < b  # both outcomes occur


def _first_tokens_distribution(target, prompt, n_tokens, cfg: SamplingConfig):
    """Exact joint distribution of the first ``n_tokens`` new tokens under the warped target: ``[V]*n``."""
    seqs = [()]
    joint = {(): 1.0}
    for _ in range(n_tokens):
        ids = jnp.asarray([list(prompt) + list(s) for s in seqs])
        logits = target(ids).logits[:, -1]
        p = np.asarray(jax.nn.softmax(warp_logits(logits, cfg), axis=-1), np.float64)
        joint = {s + (v,): joint[s] * p[i, v] for i, s in enumerate(seqs) for v in range(V)}
        seqs = list(joint)
    return joint


def _chi_square_pvalue(samples: np.ndarray, joint: dict) -> float:
    keys = list(joint)
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    for row in map(tuple, samples):
        counts[index[row]] += 1
    expected = np.array([joint[k] for k in keys]) * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert counts[expected == 0].sum() == 0, "sampled a token sequence of probability zero"
    return sps.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


ALPHA = 1e-3   # significance level of each losslessness test
N_SAMPLES = 6000


def _sample_first_tokens(target, draft, prompt, cfg, threshold=0.0, seed=0, n=N_SAMPLES):
    out = dj.speculative_generate(target, draft, [prompt] * n, max_new_tokens=3, temperature=cfg.temperature,
                                  top_k=cfg.top_k, top_p=cfg.top_p, threshold=threshold, stop_token_ids=(),
                                  seed=seed)
    assert (out.lengths == 3).all()
    return out.tokens[:, :3]


@pytest.mark.parametrize("case", ["bad_draft", "markov_draft", "threshold", "top_k_top_p"])
def test_lossless_first_three_tokens(plain_target, bigram_target, draft_factory, case):
    """Chi-square goodness of fit of the first 3 tokens (16^3 cells, pooled below 5 expected) at level 1e-3."""
    prompt = [3, 7, 1]
    if case == "bad_draft":
        target, draft, cfg, thr = plain_target, draft_factory(plain_target, rank=4), SamplingConfig(1.0), 0.0
    elif case == "markov_draft":
        target, cfg, thr = bigram_target, SamplingConfig(1.0), 0.0
        draft = draft_factory(bigram_target, oracle_scale=0.7)           # close to, not equal to, the target
    elif case == "threshold":
        target, cfg, thr = bigram_target, SamplingConfig(1.0), 0.5
        draft = draft_factory(bigram_target, oracle_scale=0.7)
    else:
        target, cfg, thr = plain_target, SamplingConfig(0.8, top_k=6, top_p=0.9), 0.0
        draft = draft_factory(plain_target, rank=4)
    samples = _sample_first_tokens(target, draft, prompt, cfg, thr, seed=5)
    assert _chi_square_pvalue(samples, _first_tokens_distribution(target, prompt, 3, cfg)) > ALPHA


def test_biased_verifier_is_caught(plain_target, draft_factory, monkeypatch):
    """The same test fails for a verifier that samples the correction from p_t instead of the residual."""

    def biased(draft_tokens, draft_logits, target_logits, proposal_lengths, key, cfg):
        v = verify_block(draft_tokens, draft_logits, target_logits, proposal_lengths, key, cfg)
        pt = jnp.take_along_axis(target_logits, v.num_accepted[:, None, None], axis=1)[:, 0]
        # key holds one key per row (per-request sampling): fold each, draw each row from its own
        nxt = categorical(jax.vmap(lambda k: jax.random.fold_in(k, 7))(key), warp_logits(pt, cfg))
        return type(v)(num_accepted=v.num_accepted, next_token=nxt.astype(jnp.int32), accepted=v.accepted)

    monkeypatch.setattr(spec_mod, "verify_block", biased)
    # only the loop retraces (the patched verifier is read at trace time): jax.clear_caches() would make this and
    # every later test of the file recompile each eager op as well (~280 programs)
    _spec_jit.clear_cache()
    try:
        draft = draft_factory(plain_target, rank=4, seed=2)
        draft.norm.weight[...] = draft.norm.weight[...] * 8.0        # a confident, wrong draft: strong bias
        samples = _sample_first_tokens(plain_target, draft, [3, 7, 1], SamplingConfig(1.0), seed=9)
        joint = _first_tokens_distribution(plain_target, [3, 7, 1], 3, SamplingConfig(1.0))
        assert _chi_square_pvalue(samples, joint) < ALPHA
    finally:
        monkeypatch.undo()
        _spec_jit.clear_cache()


def test_rows_decoded_together_are_independent_and_lossless(plain_target, draft_factory):
    """Different prompts in one batch: each row's first token follows its own prompt's distribution."""
    draft = draft_factory(plain_target, rank=4)
    prompts = [[3, 7, 1], [9, 9, 2, 5, 4]]
    n = 3000
    out = dj.speculative_generate(plain_target, draft, prompts * n, max_new_tokens=2, temperature=1.0,
                                  stop_token_ids=(), seed=3)
    for r, prompt in enumerate(prompts):
        samples = out.tokens[r::2, :2]
        assert _chi_square_pvalue(samples,
                                  _first_tokens_distribution(plain_target, prompt, 2, SamplingConfig(1.0))) > ALPHA


def test_bad_input(plain_target, bigram_target, draft_factory):
    draft = draft_factory(plain_target, rank=4)
    with pytest.raises(ValueError, match="prompts is empty"):
        dj.speculative_generate(plain_target, draft, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        dj.speculative_generate(plain_target, draft, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="confidence head"):
        dj.speculative_generate(plain_target, draft_factory(plain_target, kind=None, confidence=False), [[1]],
                                max_new_tokens=4, threshold=0.5)
    other = dj.build_target(dj.TargetConfig(model_type="qwen3", vocab_size=V + 4, hidden_size=16,
                                            intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="vocab_size"):
        dj.speculative_generate(other, draft, [[1]], max_new_tokens=4)
    with pytest.raises(ValueError, match="scheduler"):
        dj.speculative_generate(plain_target, draft, [[1]], max_new_tokens=4, scheduler=object())


def test_draft_equal_to_target_accepts_everything_when_sampling(bigram_target, draft_factory):
    """W2 = the exact bigram logit table and a zero backbone: p_d == p_t, so tau = Bs + 1 at temperature 1."""
    draft = draft_factory(bigram_target, oracle_scale=1.0)
    out = dj.speculative_generate(bigram_target, draft, PROMPTS, max_new_tokens=21, temperature=1.0,
                                  stop_token_ids=(), seed=4)
    assert out.stats["tau"] == 5.0
    _check_round_invariants(out, 21, 4)


def _eagle3(target, seed=1):
    cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4), num_draft_layers=1,
                         ttt_length=4)
    return dj.build_draft(target, cfg, seed=seed)


@pytest.fixture(scope="module")
def deep_target():
    from spec_pairs import _target

    return _target(seed=5, layers=7)


def test_eagle3_greedy_equals_target_greedy(deep_target):
    draft = _eagle3(deep_target)
    ref = dj.generate(deep_target, PROMPTS, max_new_tokens=20, stop_token_ids=())
    out = dj.speculative_generate(deep_target, draft, PROMPTS, max_new_tokens=20, stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    _check_round_invariants(out, 20, 4)
    stop = int(ref.tokens[0, 5])
    ref = dj.generate(deep_target, PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    out = dj.speculative_generate(deep_target, draft, PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_eagle3_lossless_first_three_tokens(deep_target):
    samples = _sample_first_tokens(deep_target, _eagle3(deep_target), [3, 7, 1], SamplingConfig(1.0), seed=2)
    assert _chi_square_pvalue(samples,
                              _first_tokens_distribution(deep_target, [3, 7, 1], 3, SamplingConfig(1.0))) > ALPHA


def test_invariants_hold_with_stop_tokens_inside_accepted_drafts(bigram_target, draft_factory):
    draft = draft_factory(bigram_target, oracle_scale=50.0)
    free = dj.generate(bigram_target, PROMPTS, max_new_tokens=20, stop_token_ids=())
    stop = int(free.tokens[3, 4])
    out = dj.speculative_generate(bigram_target, draft, PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    _check_round_invariants(out, 20, 4)
