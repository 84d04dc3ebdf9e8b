"""Qwen3 / Qwen3-MoE targets against transformers (torch CPU, fp32) on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prefill_check import assert_prefill_matches_empty_cache_forward

torch = pytest.importorskip("torch", reason="torch (test extra) runs the transformers reference")

KINDS = ("dense", "odd", "moe")
TOL = 1e-4


def _hf_forward(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids)), output_hidden_states=True)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_taps_match_transformers(kind, hf_models, jax_targets, rng):
    _, hf = hf_models[kind]
    target = jax_targets[kind]
    n_layers = target.config.num_hidden_layers
    ids = rng.integers(0, target.config.vocab_size, size=(2, 13))
    ref = _hf_forward(hf, ids)
    taps = (-1,) + tuple(range(n_layers))
    out = target(jnp.asarray(ids), tap_layer_ids=taps)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=TOL, rtol=0)
    h = target.config.hidden_size
    for j, layer_id in enumerate(taps):
        got = np.asarray(out.taps[..., j * h:(j + 1) * h])
        want = ref.hidden_states[layer_id + 1].numpy()
        if layer_id == n_layers - 1:
            # transformers' last hidden_states entry is post-norm; our tap is the raw layer output
            np.testing.assert_allclose(np.asarray(out.last_hidden), want, atol=TOL, rtol=0)
            continue
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"tap {layer_id}")


@pytest.mark.parametrize("kind", KINDS)
def test_taps_concatenate_in_list_order(kind, jax_targets, rng):
    target = jax_targets[kind]
    ids = jnp.asarray(rng.integers(0, target.config.vocab_size, size=(1, 7)))
    a = target(ids, tap_layer_ids=(0, -1)).taps
    b = target(ids, tap_layer_ids=(-1,)).taps
    c = target(ids, tap_layer_ids=(0,)).taps
    h = target.config.hidden_size
    assert a.shape == (1, 7, 2 * h)
    np.testing.assert_array_equal(np.asarray(a[..., :h]), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a[..., h:]), np.asarray(b))


def test_bad_tap_ids_are_rejected(jax_targets):
    target = jax_targets["dense"]
    with pytest.raises(ValueError, match="tap_layer_ids"):
        target(jnp.zeros((1, 3), jnp.int32), tap_layer_ids=(target.config.num_hidden_layers,))


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_token_by_token_equals_full_forward(kind, jax_targets, rng):
    target = jax_targets[kind]
    ids = jnp.asarray(rng.integers(0, target.config.vocab_size, size=(2, 12)))
    full = target(ids, tap_layer_ids=(0,))
    step = jax.jit(lambda t, c: target(t, c, tap_layer_ids=(0,)))
    cache = target.init_cache(2, 16)
    out = target(ids[:, :5], cache, tap_layer_ids=(0,))
    logits, taps, cache = [out.logits], [out.taps], out.cache
    for i in range(5, 12):
        out = step(ids[:, i:i + 1], cache)
        logits.append(out.logits)
        taps.append(out.taps)
        cache = out.cache
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 12])
    np.testing.assert_allclose(np.concatenate(logits, 1), np.asarray(full.logits), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.concatenate(taps, 1), np.asarray(full.taps), atol=TOL, rtol=0)


def test_ragged_rows_through_the_cache(jax_targets, rng):
    """Rows of different prompt lengths, extended by a ragged number of tokens, match per-row forwards."""
    target = jax_targets["moe"]
    vocab = target.config.vocab_size
    seqs = [rng.integers(0, vocab, size=n) for n in (4, 9, 6)]
    cache = target.init_cache(3, 24)
    prompt_lens = np.array([3, 6, 1])
    ids = np.zeros((3, 8), np.int32)
    for b, s in enumerate(seqs):
        ids[b, :prompt_lens[b]] = s[:prompt_lens[b]]
    extend = jax.jit(lambda t, c, n: target(t, c, num_new=n))
    out = extend(jnp.asarray(ids), cache, jnp.asarray(prompt_lens))
    got_last = [np.asarray(out.logits[b, prompt_lens[b] - 1]) for b in range(3)]
    cache = out.cache
    # second extension: ragged counts, padded to a common width (same compiled shape as above)
    more = np.array([len(s) for s in seqs]) - prompt_lens
    ids2 = np.zeros((3, 8), np.int32)
    for b, s in enumerate(seqs):
        ids2[b, :more[b]] = s[prompt_lens[b]:]
    out2 = extend(jnp.asarray(ids2), cache, jnp.asarray(more))
    np.testing.assert_array_equal(np.asarray(out2.cache.lengths), [len(s) for s in seqs])
    for b, s in enumerate(seqs):
        ref = np.asarray(target(jnp.asarray(s)[None]).logits[0])
        np.testing.assert_allclose(got_last[b], ref[prompt_lens[b] - 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out2.logits[b, :more[b]]), ref[prompt_lens[b]:], atol=TOL, rtol=0)


def test_cropped_and_reextended_cache_equals_fresh(jax_targets, rng):
    target = jax_targets["dense"]
    vocab = target.config.vocab_size
    ids = jnp.asarray(rng.integers(0, vocab, size=(2, 10)))
    junk = jnp.asarray(rng.integers(0, vocab, size=(2, 4)))
    cache = target.init_cache(2, 20)
    cache = target(ids[:, :7], cache).cache
    cache = target(junk, cache).cache                       # speculative tokens that get rejected
    cache = cache.crop(jnp.array([7, 5]))                    # per-row crop
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 5])
    # re-extend row 0 from 7 and row 1 from 5 with the true continuation (ragged, padded to 5)
    cont = np.zeros((2, 5), np.int32)
    cont[0, :3] = np.asarray(ids[0, 7:10])
    cont[1, :5] = np.asarray(ids[1, 5:10])
    out = target(jnp.asarray(cont), cache, num_new=jnp.array([3, 5]))
    full = np.asarray(target(ids).logits)
    np.testing.assert_allclose(np.asarray(out.logits[0, :3]), full[0, 7:10], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.logits[1, :5]), full[1, 5:10], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), [10, 10])


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_into_a_fresh_cache_equals_extending_an_empty_one(kind, jax_targets, rng):
    """``prefill`` (attention within the prompt only) gives the logits, taps and cache of a forward against an
    empty cache, for right-padded rows of different lengths, and decoding continues from its cache the same."""
    assert_prefill_matches_empty_cache_forward(jax_targets[kind], rng, lengths=[8, 5], capacity=13, taps=(0, 1),
                                               tol=TOL)
    with pytest.raises(ValueError, match="capacity 6 < 8"):
        jax_targets[kind].prefill(jnp.zeros((2, 8), jnp.int32), 6)


def test_logits_at_selects_positions(jax_targets, rng):
    target = jax_targets["odd"]
    ids = jnp.asarray(rng.integers(0, target.config.vocab_size, size=(2, 6)))
    full = np.asarray(target(ids).logits)
    at = jnp.array([[5, 0], [2, 3]])
    part = np.asarray(target(ids, logits_at=at).logits)
    np.testing.assert_allclose(part[0], full[0, [5, 0]], atol=1e-6)
    np.testing.assert_allclose(part[1], full[1, [2, 3]], atol=1e-6)


def test_bf16_target_runs_close_to_fp32(hf_models, rng):
    import dspark_jax as dj

    path, _ = hf_models["dense"]
    t32 = dj.load_target(path)
    t16 = dj.load_target(path, dtype="bfloat16")
    ids = jnp.asarray(rng.integers(0, t32.config.vocab_size, size=(1, 8)))
    l32 = np.asarray(t32(ids).logits)
    l16 = np.asarray(t16(ids).logits.astype(jnp.float32))
    assert t16(ids).logits.dtype == jnp.bfloat16
    assert np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()
