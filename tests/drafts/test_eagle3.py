"""Eagle3 draft (spec §5, DRAFT_FORMATS §1.5): checkpoint layout, TTT forward vs chain drafting, masks, loss.

The tiny target has 8 layers and the draft taps (0..4), the 5 taps DeepSpec's Eagle3 requires. The reference
semantics checked here come from DeepSpec's ``deepspec/modeling/eagle3/{common.py,loss.py,qwen3/modeling.py}``
and ``deepspec/eval/eagle3/evaluator.py``.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import safe_open

import dspark_jax as dj
from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.decode.sampling import SamplingConfig
from dspark_jax.drafts.eagle3 import Eagle3Draft, shift_left, ttt_attention
from dspark_jax.kernels import attention_reference
from dspark_jax.train.eagle3_loss import eagle3_loss

V, H, NH, NKV, HD, I = 32, 16, 2, 1, 8, 32
TAPS = (0, 1, 2, 3, 4)
T = 3            # ttt_length
B, S = 2, 10


def _draft_config(**kw):
    base = dict(architecture="Qwen3Eagle3Model", target_layer_ids=TAPS, num_draft_layers=1, ttt_length=T)
    base.update(kw)
    return dj.DraftConfig(**base)


@pytest.fixture(scope="module")
def target():
    return dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                        num_hidden_layers=8, num_attention_heads=NH, num_key_value_heads=NKV,
                                        head_dim=HD, initializer_range=0.2))


@pytest.fixture(scope="module")
def drafts(target):
    """num_draft_layers -> draft (1 as released; 2 checks that the cache stays causal across layers)."""
    return {d: dj.build_draft(target, _draft_config(num_draft_layers=d), seed=5 + d) for d in (1, 2)}


@pytest.fixture(scope="module")
def batch(target):
    ids = jax.random.randint(jax.random.key(3), (B, S), 0, V, dtype=jnp.int32)
    out = target(ids, tap_layer_ids=TAPS)
    loss_mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                           [0, 1, 1, 1, 0, 1, 1, 1, 1, 0]], jnp.int32)
    return dict(input_ids=ids, loss_mask=loss_mask, target_hidden=out.taps, target_last_hidden=out.last_hidden)


@nnx.jit
def _train(draft, ids, loss_mask, taps, last, attention_mask):
    return draft.train_forward(ids, loss_mask, taps, last, attention_mask)


@pytest.fixture(scope="module")
def train_out(drafts, batch):
    return {d: _train(m, batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                      batch["target_last_hidden"], None) for d, m in drafts.items()}


# ---- config and checkpoint ---------------------------------------------------------------------

def test_rejects_taps_other_than_five(target):
    with pytest.raises(ValueError, match="5"):          # ConfigError is a ValueError
        dj.build_draft(target, _draft_config(target_layer_ids=(0, 1, 2)))
    with pytest.raises(ConfigError, match="-1"):
        _draft_config(target_layer_ids=(-1, 0, 1, 2, 3))


def _expected_keys(layers=1):
    """DRAFT_FORMATS §1.5 for the tiny config."""
    keys = {"embed_tokens.weight": (V, H), "fc.weight": (H, 5 * H), "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(layers):
        p = f"layers.{i}."
        keys.update({p + "hidden_norm.weight": (H,), p + "input_layernorm.weight": (H,),
                     p + "post_attention_layernorm.weight": (H,),
                     p + "self_attn.q_proj.weight": (NH * HD, 2 * H), p + "self_attn.k_proj.weight": (NKV * HD, 2 * H),
                     p + "self_attn.v_proj.weight": (NKV * HD, 2 * H), p + "self_attn.o_proj.weight": (H, NH * HD),
                     p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,),
                     p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                     p + "mlp.down_proj.weight": (H, I)})
    return keys


def _listing(path):
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("layers", [1, 2])
def test_checkpoint_keys_and_shapes(drafts, tmp_path, layers):
    dj.save_draft(drafts[layers], tmp_path)
    assert _listing(tmp_path) == _expected_keys(layers)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["Qwen3Eagle3Model"]
    assert cfg["target_layer_ids"] == list(TAPS) and cfg["ttt_length"] == T and cfg["step_loss_decay"] == 0.8
    assert cfg["num_hidden_layers"] == cfg["draft_num_hidden_layers"] == layers
    assert cfg["tie_word_embeddings"] is False


def test_checkpoint_round_trip_bit_identical(drafts, target, tmp_path):
    draft = drafts[1]
    dj.save_draft(draft, tmp_path / "a")
    loaded = dj.load_draft(tmp_path / "a")
    assert isinstance(loaded, Eagle3Draft) and loaded.config.is_eagle3 and loaded.config.ttt_length == T
    dj.save_draft(loaded, tmp_path / "b")
    again = dj.load_draft(tmp_path / "b")
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for x, y, z in zip(jax.tree.leaves(nnx.state(draft)), jax.tree.leaves(nnx.state(loaded)),
                       jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
    np.testing.assert_array_equal(a["embed_tokens.weight"], np.asarray(target.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(a["lm_head.weight"], np.asarray(target.lm_head.kernel[...]).T)


# ---- TTT forward vs inference -----------------------------------------------------------------

def test_target_alignment_and_position_mask(drafts, batch):
    """Step j, position t: target = lm_head(last_hidden[t+j+1]), uniform (zero logits) past the end; mask =
    loss_mask with the last valid token zeroed, shifted left by j (``_build_next_token_position_mask``)."""
    draft = drafts[1]
    attn = jnp.array([[1] * S, [1] * 7 + [0] * 3], jnp.int32)
    out = _train(draft, batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                 batch["target_last_hidden"], attn)
    full = np.asarray(draft.base_logits(batch["target_last_hidden"]))
    tl = np.asarray(out.target_logits)
    pm = np.asarray(batch["loss_mask"], np.float32).copy()
    pm[np.arange(B), np.maximum(np.asarray(attn).sum(-1) - 1, 0)] = 0
    for j in range(T):
        for t in range(S):
            want = full[:, t + j + 1] if t + j + 1 < S else np.zeros((B, V), np.float32)
            np.testing.assert_allclose(tl[j, :, t], want, atol=1e-6)
            want_m = pm[:, t + j] if t + j < S else np.zeros(B)
            np.testing.assert_array_equal(np.asarray(out.position_mask[j, :, t]), want_m)


@nnx.jit
def _rows(draft, cache, taps, tokens, count):
    return draft.forward_cached(cache, draft.project_features(taps), tokens, count)


@pytest.mark.parametrize("layers", [1, 2])
def test_step0_equals_cached_inference(drafts, batch, train_out, layers):
    """TTT step 0 = the inference forward over (feature i, token i+1) at position i, in one go and when the
    prompt arrives in uneven chunks per row."""
    draft = drafts[layers]
    want = np.asarray(train_out[layers].draft_logits[0])
    taps, toks = batch["target_hidden"], shift_left(batch["input_ids"], 1)
    cache = draft.init_cache(B, S + T)
    _, hid = _rows(draft, cache, taps, toks, jnp.full((B,), S, jnp.int32))
    np.testing.assert_allclose(np.asarray(draft.compute_logits(hid)), want, atol=2e-5)

    # chunks of per-row sizes, padded to a fixed width
    splits = [[3, 4, 3], [1, 6, 3]]
    got = np.zeros_like(want)
    done = np.zeros(B, int)
    for step in range(3):
        cnt = np.array([splits[r][step] for r in range(B)])
        idx = np.minimum(done[:, None] + np.arange(6)[None, :], S - 1)
        rows_taps = jnp.take_along_axis(taps, jnp.asarray(idx)[..., None], axis=1)
        rows_toks = jnp.take_along_axis(toks, jnp.asarray(idx), axis=1)
        cache, hid = _rows(draft, cache, rows_taps, rows_toks, jnp.asarray(cnt, jnp.int32))
        lg = np.asarray(draft.compute_logits(hid))
        for r in range(B):
            got[r, done[r]:done[r] + cnt[r]] = lg[r, :cnt[r]]
        done += cnt
    np.testing.assert_array_equal(np.asarray(cache.lengths), [S, S])
    np.testing.assert_allclose(got, want, atol=2e-5)


@nnx.jit
def _chain(draft, cache, taps, tokens, count, forced):
    cache, last = draft.extend(cache, taps, tokens, count)
    prop = draft.propose(cache, last, jax.random.key(0), forced_tokens=forced)
    again = draft.propose(prop.cache, last, jax.random.key(0), forced_tokens=forced)
    return prop, again, cache.lengths


@pytest.mark.parametrize("layers", [1, 2])
def test_chain_drafting_equals_ttt_steps(drafts, batch, train_out, layers):
    """THE key test: the j-th chain step from the last committed position t, with the drafted tokens forced to
    the data, equals TTT step j at position t (for every t with t + j < S)."""
    draft = drafts[layers]
    want = np.asarray(train_out[layers].draft_logits)                 # [T,B,S,V]
    ids = batch["input_ids"]
    taps, toks = batch["target_hidden"], shift_left(ids, 1)
    checked = 0
    for t0 in range(S - 1):
        t = np.array([t0, (t0 + 4) % (S - 1)])                       # rows at different lengths
        forced = jnp.stack([shift_left(ids, int(t[r]) + 2)[r, :T] for r in range(B)])
        cache = draft.init_cache(B, S + T)
        prop, again, lengths = _chain(draft, cache, taps, toks, jnp.asarray(t + 1, jnp.int32), forced)
        np.testing.assert_array_equal(np.asarray(lengths), t + 1)
        np.testing.assert_array_equal(np.asarray(prop.cache.lengths), t + 1)     # cropped back
        np.testing.assert_array_equal(np.asarray(prop.tokens), np.asarray(forced))
        np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(prop.logits))   # rollback is clean
        for r in range(B):
            for j in range(T):
                if t[r] + j < S:
                    np.testing.assert_allclose(np.asarray(prop.logits[r, j]), want[j, r, t[r]], atol=3e-5,
                                               err_msg=f"row {r} t={t[r]} step {j}")
                    checked += 1
    assert checked > 40


@nnx.jit(static_argnames=("sampling", "stop_token_ids"))
def _propose(draft, cache, last, key, sampling=SamplingConfig(), stop_token_ids=(), forced_tokens=None):
    return draft.propose(cache, last, key, sampling, stop_token_ids=stop_token_ids, forced_tokens=forced_tokens)


def test_propose_sampling_greedy_and_stop(drafts, batch):
    draft = drafts[1]
    cache = draft.init_cache(B, S + T)
    cache, last = nnx.jit(lambda d, c, f, t, n: d.extend(c, f, t, n))(
        draft, cache, batch["target_hidden"], shift_left(batch["input_ids"], 1), jnp.array([5, 8], jnp.int32))
    greedy = _propose(draft, cache, last, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(jnp.argmax(greedy.logits, -1)))
    assert greedy.tokens.shape == (B, T) and greedy.logits.shape == (B, T, V)
    np.testing.assert_array_equal(np.asarray(greedy.cache.lengths), [5, 8])
    np.testing.assert_array_equal(np.asarray(greedy.num_proposed), [T, T])
    # greedy chain = forced chain with the greedy tokens
    forced = _propose(draft, cache, last, jax.random.key(1), forced_tokens=greedy.tokens)
    np.testing.assert_allclose(np.asarray(forced.logits), np.asarray(greedy.logits), atol=1e-6)
    stop = int(greedy.tokens[0, 1])
    stopped = _propose(draft, cache, last, jax.random.key(1), stop_token_ids=(stop,))
    first = [int(np.argmax(np.asarray(greedy.tokens[r]) == stop)) + 1 if stop in np.asarray(greedy.tokens[r])
             else T for r in range(B)]
    np.testing.assert_array_equal(np.asarray(stopped.num_proposed), first)
    sampled = _propose(draft, cache, last, jax.random.key(2), SamplingConfig(temperature=1.0))
    assert sampled.tokens.shape == (B, T) and np.all((np.asarray(sampled.tokens) >= 0)
                                                    & (np.asarray(sampled.tokens) < V))


def test_rounds_propose_crop_commit(drafts, batch, train_out):
    """Decode-loop use: prompt, propose (chain keys written then cropped), commit m+1 rows paired with the
    verify rows' taps; the committed rows' outputs equal TTT step 0 (stale chain keys stay invisible)."""
    draft = drafts[2]
    want = np.asarray(train_out[2].draft_logits[0])
    taps, toks = batch["target_hidden"], shift_left(batch["input_ids"], 1)
    cache = draft.init_cache(B, S + T)
    cache, hid = _rows(draft, cache, taps, toks, jnp.array([4, 2], jnp.int32))
    last = hid[jnp.arange(B), jnp.array([3, 1])]
    for commit in ([3, 2], [2, 4]):
        prop = _propose(draft, cache, last, jax.random.key(0), SamplingConfig(temperature=1.0))
        start = np.asarray(prop.cache.lengths)
        idx = jnp.asarray(np.minimum(start[:, None] + np.arange(4)[None, :], S - 1))
        cache, hid = _rows(draft, prop.cache, jnp.take_along_axis(taps, idx[..., None], axis=1),
                           jnp.take_along_axis(toks, idx, axis=1), jnp.asarray(commit, jnp.int32))
        lg = np.asarray(draft.compute_logits(hid))
        for r in range(B):
            np.testing.assert_allclose(lg[r, :commit[r]], want[r, start[r]:start[r] + commit[r]], atol=2e-5)
        last = hid[jnp.arange(B), jnp.asarray(commit) - 1]
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 8])


# ---- masks ------------------------------------------------------------------------------------

def _flex_mask(lengths, j, s):
    """DeepSpec's ``eagle3_mask_mod`` (common.py) with ``lck = j``: ``[B, S, (j+1)*S]``."""
    seq = np.maximum(np.asarray(lengths) - j, 0)[:, None, None]
    q = np.arange(s)[None, :, None]
    kv = np.arange((j + 1) * s)[None, None, :]
    causal = (q >= kv) & (kv < seq)
    suffix = (kv >= s) & ((kv % s) < seq) & (((kv - q) % s) == 0)
    return (q < seq) & (causal | suffix)


def test_ttt_attention_equals_flex_mask():
    s, nh, nkv, hd, steps = 7, 4, 2, 8, 4
    lengths = np.array([7, 4])
    rng = np.random.default_rng(0)
    q = rng.normal(size=(steps, 2, s, nh, hd)).astype(np.float32)
    k = rng.normal(size=(2, steps * s, nkv, hd)).astype(np.float32)
    v = rng.normal(size=(2, steps * s, nkv, hd)).astype(np.float32)

    @jax.jit
    def both(q, k, v):
        res = []
        for j in range(steps):
            kd = k[:, s:(j + 1) * s].reshape(2, j, s, nkv, hd).transpose(0, 2, 1, 3, 4)
            vd = v[:, s:(j + 1) * s].reshape(2, j, s, nkv, hd).transpose(0, 2, 1, 3, 4)
            got = ttt_attention(q[j], k[:, :s], v[:, :s], kd, vd, jnp.asarray(np.maximum(lengths - j, 0)), 0.3)
            want = attention_reference(q[j], k[:, :(j + 1) * s], v[:, :(j + 1) * s],
                                       jnp.asarray(_flex_mask(lengths, j, s)), 0.3)
            res.append((got, want))
        return res

    for j, (got, want) in enumerate(both(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        assert np.all(np.asarray(got)[1, max(4 - j, 0):] == 0)          # masked queries give exactly 0


def test_no_future_leak_and_padding_ignored(drafts, batch, train_out):
    """Logits at (step j, position t) depend only on taps <= t and tokens <= t+j+1; with a shorter valid
    length, padding content is invisible to every valid query (t < len - j)."""
    draft = drafts[2]
    base = np.asarray(train_out[2].draft_logits)
    c = 5
    noise = jax.random.normal(jax.random.key(9), batch["target_hidden"].shape)
    pos = jnp.arange(S)[None, :, None]
    taps2 = jnp.where(pos > c, batch["target_hidden"] + noise, batch["target_hidden"])
    ids2 = jnp.where(jnp.arange(S)[None, :] > c + 1, (batch["input_ids"] + 7) % V, batch["input_ids"])
    out = np.asarray(_train(draft, ids2, batch["loss_mask"], taps2, batch["target_last_hidden"], None).draft_logits)
    for j in range(T):
        for t in range(S):
            same = np.allclose(out[j, :, t], base[j, :, t], atol=1e-6)
            assert same == (t + j <= c), (j, t)

    attn = jnp.array([[1] * S, [1] * 6 + [0] * 4], jnp.int32)
    a = np.asarray(_train(draft, batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                          batch["target_last_hidden"], attn).draft_logits)
    row1 = jnp.arange(S)[None, :, None] >= 6
    taps3 = jnp.where(row1 & (jnp.arange(B)[:, None, None] == 1), noise, batch["target_hidden"])
    b = np.asarray(_train(draft, batch["input_ids"], batch["loss_mask"], taps3, batch["target_last_hidden"],
                          attn).draft_logits)
    np.testing.assert_allclose(a[:, 0], base[:, 0], atol=1e-6)
    for j in range(T):
        np.testing.assert_allclose(b[j, 1, :6 - j], a[j, 1, :6 - j], atol=1e-6)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))


# ---- loss -------------------------------------------------------------------------------------

def _reference_loss(draft_logits, target_last_logits, loss_mask, attn, ttt, decay):
    """A numpy transcription of DeepSpec's compute_eagle3_loss (Triton kernel = masked soft CE / B*S)."""
    dl = np.asarray(draft_logits, np.float64)
    tl = np.asarray(target_last_logits, np.float64)
    b, s, v = tl.shape
    probs = np.exp(tl - tl.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    padded = np.concatenate([probs[:, 1:], np.full((b, ttt + 1, v), 1.0 / v)], axis=1)
    pm = np.asarray(loss_mask, np.float64).copy()
    pm[np.arange(b), np.maximum(np.asarray(attn).sum(-1) - 1, 0)] = 0
    total, steps = 0.0, []
    for j in range(ttt):
        tp = padded[:, j:j + s]
        lp = dl[j] - dl[j].max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        row = np.where(pm != 0, -(tp * lp).sum(-1), 0.0)
        steps.append(row.sum() / (b * s))
        total += decay ** j * steps[-1]
        pm = np.concatenate([pm[:, 1:], np.zeros((b, 1))], axis=1)
    return total, steps


def test_loss_matches_deepspec_transcription(drafts, batch, train_out):
    draft = drafts[1]
    out = train_out[1]
    loss, m = eagle3_loss(out, draft.config)
    want, steps = _reference_loss(out.draft_logits, draft.base_logits(batch["target_last_hidden"]),
                                  batch["loss_mask"], np.ones((B, S), int), T, 0.8)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for j in range(T):
        np.testing.assert_allclose(float(m[f"ploss_{j}"]), steps[j], rtol=1e-5)
    np.testing.assert_allclose(float(loss), sum(0.8 ** j * steps[j] for j in range(T)), rtol=1e-6)
    chunked, mc = eagle3_loss(out, draft.config, vocab_chunk=7)                    # 32 = 5 chunks of 7, padded
    np.testing.assert_allclose(float(chunked), float(loss), rtol=1e-5)
    for k in m:
        np.testing.assert_allclose(float(mc[k]), float(m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    other = eagle3_loss(out, draft.config.replace(step_loss_decay=0.5))[0]
    np.testing.assert_allclose(float(other), sum(0.5 ** j * steps[j] for j in range(T)), rtol=1e-5)


def test_loss_numerics_synthetic():
    """Normalisation by B*S (not by the mask count), uniform targets past the end, accuracy/tau metrics."""
    from dspark_jax.drafts.eagle3 import Eagle3TrainOutput

    ttt, b, s, v = 3, 2, 4, 5
    rng = np.random.default_rng(0)
    d = rng.normal(size=(ttt, b, s, v)).astype(np.float32)
    t = rng.normal(size=(ttt, b, s, v)).astype(np.float32)
    mask = np.zeros((ttt, b, s), np.float32)
    mask[0, 0, 1] = 1.0
    mask[2, 1, 3] = 1.0
    t[2, 1, 3] = 0.0                                                      # past the end: uniform target
    out = Eagle3TrainOutput(draft_logits=jnp.asarray(d), target_logits=jnp.asarray(t),
                            position_mask=jnp.asarray(mask), draft_hidden=jnp.zeros((ttt, b, s, 1)),
                            target_hidden=jnp.zeros((ttt, b, s, 1)), lm_head=jnp.zeros((v, 1)))
    loss, m = eagle3_loss(out, _draft_config())

    def soft_ce(x, p):
        return -(p * (x - np.log(np.exp(x).sum()))).sum()

    p0 = np.exp(t[0, 0, 1]) / np.exp(t[0, 0, 1]).sum()
    l0 = soft_ce(d[0, 0, 1], p0) / (b * s)
    l2 = soft_ce(d[2, 1, 3], np.full(v, 1 / v)) / (b * s)
    np.testing.assert_allclose(float(m["ploss_0"]), l0, rtol=1e-5)
    np.testing.assert_allclose(float(m["ploss_1"]), 0.0)
    np.testing.assert_allclose(float(m["ploss_2"]), l2, rtol=1e-5)
    np.testing.assert_allclose(float(loss), l0 + 0.64 * l2, rtol=1e-5)
    assert float(m["valid_tokens@0"]) == 1 and float(m["valid_tokens@1"]) == 0
    acc0 = float(np.argmax(d[0, 0, 1]) == np.argmax(t[0, 0, 1]))
    np.testing.assert_allclose(float(m["accuracy@0"]), acc0)
    np.testing.assert_allclose(float(m["tau_greedy"]), 1.0 + acc0)      # step 1 is invalid: the chain stops


# ---- training ---------------------------------------------------------------------------------

def test_training_steps_keep_embed_and_head_frozen(target, batch):
    draft = dj.build_draft(target, _draft_config(), seed=11)
    opt = nnx.Optimizer(draft, optax.adamw(1e-2), wrt=nnx.Param)
    attn = jnp.array([[1] * S, [1] * 7 + [0] * 3], jnp.int32)            # padded row: fully masked queries

    @nnx.jit
    def step(model, opt):
        def lf(m):
            out = m.train_forward(batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                                  batch["target_last_hidden"], attn)
            return eagle3_loss(out, m.config)[0]

        loss, grads = nnx.value_and_grad(lf)(model)
        opt.update(model, grads)
        return loss, grads

    fc0 = np.asarray(draft.fc.kernel[...])
    losses = []
    for _ in range(3):
        loss, grads = step(draft, opt)
        losses.append(float(loss))
        leaves = jax.tree.leaves(grads)
        assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(grads))}
    assert not any("embed_tokens" in p or "lm_head" in p for p in paths)
    assert any("layers.0.self_attn.q_proj" in p for p in paths) and "fc.kernel" in paths
    assert np.abs(np.asarray(grads["layers"][0]["hidden_norm"]["weight"][...])).sum() > 0
    opt_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(opt, nnx.OptState))}
    assert opt_paths and not any("embed_tokens" in p or "lm_head" in p for p in opt_paths)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.array_equal(np.asarray(draft.fc.kernel[...]), fc0)
    np.testing.assert_array_equal(np.asarray(draft.embed_tokens[...]), np.asarray(target.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(np.asarray(draft.lm_head[...]), np.asarray(target.lm_head.kernel[...]).T)
