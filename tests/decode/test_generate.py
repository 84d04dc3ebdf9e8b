"""dj.generate: greedy parity with transformers' generate, stop tokens, sampling statistics, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax.decode.sampling import SamplingConfig, warp_logits

torch = pytest.importorskip("torch", reason="torch (test extra) runs the transformers reference")

PROMPTS = [[5, 17, 33, 2], [40, 41, 7, 7, 9, 60, 61, 62, 3], [11]]


def _hf_greedy(hf, prompt, n, eos=None):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_matches_transformers_generate(kind, hf_models, jax_targets):
    _, hf = hf_models[kind]
    out = dj.generate(jax_targets[kind], PROMPTS, max_new_tokens=32, stop_token_ids=())
    assert out.tokens.shape == (3, 32)
    refs = [_hf_greedy(hf, p, 32) for p in PROMPTS]
    for row, ref in zip(out.tokens.tolist(), refs):
        assert row == ref
    assert len({tuple(r) for r in refs}) == 3 and all(len(set(r)) > 3 for r in refs), "reference too degenerate"
    np.testing.assert_array_equal(out.lengths, [32, 32, 32])


def test_stop_tokens_are_honoured(hf_models, jax_targets):
    _, hf = hf_models["dense"]
    free = [_hf_greedy(hf, p, 32) for p in PROMPTS]
    stop = free[0][10]  # a token row 0 emits at step 10 (maybe earlier too)
    out = dj.generate(jax_targets["dense"], PROMPTS, max_new_tokens=32, stop_token_ids=[stop])
    for b, p in enumerate(PROMPTS):
        ref = _hf_greedy(hf, p, 32, eos=stop)
        n = out.lengths[b]
        if stop in free[b]:
            assert n == free[b].index(stop) + 1 and out.tokens[b, n - 1] == stop
        assert out.tokens[b, :n].tolist() == ref
        assert (out.tokens[b, n:] == -1).all()
    assert out.lengths[0] <= 11


def test_same_seed_same_samples_and_seed_matters(jax_targets):
    t = jax_targets["dense"]
    a = dj.generate(t, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=())
    b = dj.generate(t, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=())
    c = dj.generate(t, PROMPTS, max_new_tokens=8, temperature=1.0, seed=4, stop_token_ids=())
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_first_sampled_token_follows_target_distribution(jax_targets):
    """Chi-square goodness of fit at significance 1e-3 with 4000 draws (expected counts >= 5 pooled)."""
    from scipy import stats

    t = jax_targets["dense"]
    prompt = [3, 9, 27]
    temperature = 1.5
    n = 4000
    out = dj.generate(t, [prompt] * n, max_new_tokens=1, temperature=temperature, seed=11, stop_token_ids=())
    logits = np.asarray(t(jnp.asarray([prompt])).logits[0, -1], np.float64) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=p.size)
    big = p * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    keep = exp > 0
    assert stats.chisquare(obs[keep], exp[keep]).pvalue > 1e-3


def test_top_k_top_p_match_transformers_warpers(rng):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    for k, p in [(5, 1.0), (0, 0.7), (10, 0.5)]:
        ours = np.asarray(warp_logits(jnp.asarray(logits), SamplingConfig(0.8, k, p)))
        ref = torch.tensor(logits) / 0.8
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(ref).numpy())
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref.numpy()[np.isfinite(ours)], rtol=1e-6)


def test_bad_input_is_a_clear_error(jax_targets):
    t = jax_targets["dense"]
    with pytest.raises(ValueError, match="prompts is empty"):
        dj.generate(t, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dj.generate(t, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocab"):
        dj.generate(t, [[1, 10_000]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dj.generate(t, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        dj.generate(t, ["hello"], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        dj.generate(t, [[1]], max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError, match="single prompt"):
        dj.generate(t, "hello", max_new_tokens=4)
