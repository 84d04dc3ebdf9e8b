"""DSpark / DFlash draft on the tiny fp32 config: spec §7 shapes and the §8 invariants 4-11.

Fixtures (tests/drafts/conftest.py): ``tiny_target`` (V=32, H=16, 4 layers), ``drafts`` (vanilla / gated / rnn
DSpark and DFlash; taps [0,1,2], D=2, Bs=4, N=3, r=4, mask id 31), ``batch`` (B=2, S=12 with target taps),
``anchors_keep``. Everything runs in fp32, so train/infer comparisons use 1e-5 tolerances.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from draft_calls import SAMPLED, assert_forced_block_matches, assert_rounds_match, block_hidden, fwd, propose, rows
from flax import nnx
from scipy import stats

from dspark_jax.config import ConfigError
from dspark_jax.drafts.backbone import training_mask
from dspark_jax.drafts.build import build_draft
from dspark_jax.kernels._dispatch import resolve as resolve_impl
from dspark_jax.kernels.vocab_loss_chunked import slot_ce_l1_chunked
from dspark_jax.train.anchors import sample_anchors
from dspark_jax.train.loss import dspark_loss, slot_ce_l1_reference, slot_weights

V, H, BS, N, R, MASK = 32, 16, 4, 3, 4, 31
TAPS = (0, 1, 2)
MARKOV_KINDS = ("vanilla", "gated", "rnn")
ALL_KINDS = MARKOV_KINDS + ("dflash",)
TOL = dict(atol=1e-5, rtol=1e-5)


# ---- jitted loss and gradients (compiled once per draft kind and shape; the other calls are draft_calls.py's) ---
@nnx.jit(static_argnames=("config", "vocab_chunk"))
def _loss_and_grads(draft, config, ids, loss_mask, taps, last, anchors, keep, vocab_chunk=None):
    def f(m):
        out = m.train_forward(ids, loss_mask, taps, last, anchors, keep, materialize_logits=vocab_chunk is None)
        return dspark_loss(out, config, vocab_chunk=vocab_chunk)

    (loss, metrics), grads = nnx.value_and_grad(f, has_aux=True)(draft)
    return loss, metrics, grads


def loss_and_grads(draft, batch, anchors, keep, config=None, vocab_chunk=None):
    return _loss_and_grads(draft, config or draft.config, batch["input_ids"], batch["loss_mask"],
                           batch["target_hidden"], batch["target_last_hidden"], jnp.asarray(anchors, jnp.int32),
                           jnp.asarray(keep), vocab_chunk=vocab_chunk)


def flat(state) -> dict[str, np.ndarray]:
    """An nnx State as {'layers.0.self_attn.q_proj.kernel': array}."""
    return {".".join(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- 1. spec §7 shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tiny_config_shapes(kind, drafts, batch):
    d = drafts[kind]
    s1 = {k: batch[k][:1, :10] for k in ("input_ids", "loss_mask", "target_hidden", "target_last_hidden")}
    assert s1["target_hidden"].shape == (1, 10, 48) and s1["target_last_hidden"].shape == (1, 10, 16)
    anchors, keep = jnp.array([[1, 4, 7]]), jnp.ones((1, 3), bool)
    assert training_mask(anchors, keep, 10, BS).shape == (1, 12, 22)
    out = fwd(d, s1, anchors, keep)
    assert out.draft_logits.shape == out.target_logits.shape == (1, 3, 4, 32)
    assert out.target_ids.shape == out.eval_mask.shape == (1, 3, 4)
    assert out.draft_hidden.shape == out.target_hidden.shape == (1, 3, 4, 16)
    assert out.lm_head.shape == (32, 16)

    p = flat(nnx.state(d))
    want = {"embed_tokens": (32, 16), "lm_head": (32, 16), "fc.kernel": (48, 16), "hidden_norm.weight": (16,),
            "norm.weight": (16,)}
    for i in range(2):
        want.update({f"layers.{i}.self_attn.q_proj.kernel": (16, 16), f"layers.{i}.self_attn.k_proj.kernel": (16, 8),
                     f"layers.{i}.self_attn.v_proj.kernel": (16, 8), f"layers.{i}.self_attn.o_proj.kernel": (16, 16),
                     f"layers.{i}.self_attn.q_norm.weight": (8,), f"layers.{i}.self_attn.k_norm.weight": (8,),
                     f"layers.{i}.mlp.gate_proj.kernel": (16, 32), f"layers.{i}.mlp.up_proj.kernel": (16, 32),
                     f"layers.{i}.mlp.down_proj.kernel": (32, 16), f"layers.{i}.input_layernorm.weight": (16,),
                     f"layers.{i}.post_attention_layernorm.weight": (16,)})
    if kind != "dflash":
        want.update({"markov_head.markov_w1": (32, 4), "markov_head.markov_w2": (32, 4),
                     "confidence_head.proj.kernel": (20, 1), "confidence_head.proj.bias": (1,)})
    if kind == "gated":
        want.update({"markov_head.gate_proj.kernel": (20, 4), "markov_head.gate_proj.bias": (4,)})
    if kind == "rnn":
        want.update({"markov_head.joint_proj.kernel": (24, 12), "markov_head.joint_proj.bias": (12,)})
    assert {k: v.shape for k, v in p.items()} == want

    if kind == "dflash":
        assert out.confidence_logits is None and out.markov_u is None and out.markov_w2 is None
    else:
        assert out.confidence_logits.shape == (1, 3, 4) and out.confidence_logits.dtype == jnp.float32
        assert out.markov_u.shape == (1, 3, 4, 4) and out.markov_w2.shape == (32, 4)

    if kind not in ("vanilla", "dflash"):     # B=1 propose compiles per kind; B=2 shapes are checked below
        return
    # inference round, prompt n=6: pending ctx [1,6,48], anchor at start=6
    cache = d.init_cache(1, 16)
    prop = propose(d, cache, s1["target_hidden"][:, :6], jnp.array([6]), s1["input_ids"][:, 6], jax.random.key(0),
                   SAMPLED)
    assert prop.tokens.shape == (1, 4) and jnp.issubdtype(prop.tokens.dtype, jnp.integer)
    assert prop.logits.shape == (1, 4, 32) and prop.block_hidden.shape == (1, 4, 16)
    if kind == "dflash":
        assert prop.confidence_logits is None
    else:
        assert prop.confidence_logits.shape == (1, 4)
    assert prop.cache.lengths.tolist() == [6]
    for k, v in zip(prop.cache.keys, prop.cache.values):
        assert k.shape == v.shape == (1, 16, 1, 8)
        assert np.all(np.abs(np.asarray(k[:, :6])).sum(-1) > 0)   # the 6 context rows were written ...
        # ... and nothing past the block: the XLA path never stores block keys; the Pallas path keeps them as
        # scratch at [start, start + Bs) beyond the length, overwritten by the next round's context
        xla = resolve_impl(d.layers[0].self_attn.attention_impl, "ragged_attention")[0] == "xla"
        past = 6 if xla else 6 + d.config.num_block_slots
        assert not np.any(np.asarray(k[:, past:])) and not np.any(np.asarray(v[:, past:]))


# ---- 2. spec §8.4 training mask ------------------------------------------------------------------------------
def test_training_mask_structure():
    s = 10
    anchors = jnp.array([[3, 3, 7, 0], [0, 5, 9, 2]])            # overlapping blocks; a kept block at a=0
    keep = jnp.array([[True, True, True, False], [True, True, True, False]])
    m = np.asarray(training_mask(anchors, keep, s, BS))
    assert m.shape == (2, 4 * BS, s + 4 * BS) and m.dtype == bool
    for b, n, k in itertools.product(range(2), range(4), range(BS)):
        row = m[b, n * BS + k]
        if not keep[b, n]:
            assert not row.any(), (b, n, k)
            continue
        a = int(anchors[b, n])
        np.testing.assert_array_equal(row[:s], np.arange(s) < a, err_msg=f"context of block {b},{n}")
        assert not row[a:s].any()                                    # the anchor's own column is excluded
        np.testing.assert_array_equal(row[s:], np.arange(4 * BS) // BS == n, err_msg=f"block part of {b},{n}")


def test_context_dependence_follows_the_mask(drafts, batch, anchors_keep):
    """d(draft_hidden[b,n]) / d(taps[b',j]) is nonzero exactly when b'=b, block kept and j < a_{b,n}."""
    d = drafts["vanilla"]
    anchors, keep = anchors_keep

    # Dependency by perturbation: move one context row taps[b', j] at a time and see which outputs change. Neither
    # jacrev (jit(jacrev) of this vmapped VJP is miscompiled by XLA:CPU in jax 0.10.2 and reports dependencies that
    # do not exist) nor jacfwd (cannot pass the Pallas kernels' custom_vjp, DSPARK_KERNEL_IMPL=pallas) works
    # everywhere; a random perturbation changes every output that depends on the row (with probability 1).
    f = lambda t: d.train_forward(batch["input_ids"], batch["loss_mask"], t, batch["target_last_hidden"],
                                  anchors, keep).draft_hidden
    taps = batch["target_hidden"]
    nb, ns = taps.shape[:2]
    noise = jax.random.normal(jax.random.key(7), taps.shape[2:], taps.dtype)

    @jax.jit
    def changes(t):
        # the unperturbed output comes out of the same compiled body (scale 0), so rounding cannot differ
        def one(x):
            idx, scale = x
            return f(t.at[idx // ns, idx % ns].add(scale * noise))
        idx = jnp.repeat(jnp.arange(nb * ns), 2)
        scale = jnp.tile(jnp.asarray([0.0, 1.0], taps.dtype), nb * ns)
        out = jax.lax.map(one, (idx, scale)).reshape(nb * ns, 2, *taps.shape[:1], -1, *f(t).shape[2:])
        return jnp.abs(out[:, 1] - out[:, 0]).max(axis=-1) > 0                             # [B'*S, B, N, Bs]

    dep = np.asarray(changes(taps)).reshape(nb, ns, *f(taps).shape[:3]).transpose(2, 3, 4, 0, 1)  # [B,N,Bs,B',S]
    a, kp = np.asarray(anchors), np.asarray(keep)
    want = np.zeros_like(dep)
    for b, n in itertools.product(range(2), range(N)):
        if kp[b, n]:
            want[b, n, :, b, :a[b, n]] = True
    np.testing.assert_array_equal(dep, want)


def test_blocks_do_not_see_each_other(drafts, batch, anchors_keep):
    """Block n of a 3-block forward equals a forward with that block alone (other anchors/tokens irrelevant)."""
    d = drafts["vanilla"]
    anchors, keep = anchors_keep
    full = fwd(d, batch, anchors, keep)
    for n in range(N):
        alone = fwd(d, batch, anchors[:, n:n + 1], keep[:, n:n + 1])
        for f in ("draft_hidden", "draft_logits", "confidence_logits", "eval_mask", "target_ids"):
            np.testing.assert_allclose(getattr(alone, f)[:, 0], getattr(full, f)[:, n], **TOL,
                                       err_msg=f"block {n}: {f}")
    # other blocks moved onto / overlapping block 0's span: block 0 unchanged
    moved = fwd(d, batch, jnp.array([[1, 2, 3], [2, 3, 4]]), jnp.ones((2, 3), bool))
    np.testing.assert_allclose(moved.draft_hidden[:, 0], full.draft_hidden[:, 0], **TOL)


@pytest.mark.parametrize("kind", ["vanilla", "dflash"])
def test_dropped_blocks_see_nothing_and_stay_finite(kind, drafts, batch):
    d = drafts[kind]
    ids = np.asarray(batch["input_ids"])
    for anchors, keep in [(jnp.array([[1, 5, 0], [2, 0, 0]]), jnp.array([[True, True, False], [True, False, False]])),
                          (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), bool))]:       # all blocks dropped
        out = fwd(d, batch, anchors, keep)
        for f in ("draft_logits", "target_logits", "confidence_logits", "draft_hidden", "markov_u"):
            x = getattr(out, f)
            assert x is None or np.all(np.isfinite(np.asarray(x))), f
        kp = np.asarray(keep)
        assert not np.asarray(out.eval_mask)[~kp].any()
        np.testing.assert_array_equal(np.asarray(out.target_ids)[~kp],
                                      np.broadcast_to(ids[:, :1, None], (2, N, BS))[~kp])
        # a dropped block is all MASK and its attention output is exactly 0, so every slot is
        # norm(embed(MASK) + MLPs): recompute that by hand
        h = d.embed(jnp.array([MASK]))
        for layer in d.layers:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = d.norm(h)[0]
        dropped = np.asarray(out.draft_hidden)[~kp]                              # [n_dropped, Bs, H]
        np.testing.assert_allclose(dropped, np.broadcast_to(h, dropped.shape), atol=1e-6, rtol=1e-6)
        loss, metrics, grads = loss_and_grads(d, batch, anchors, keep)
        assert np.isfinite(float(loss)) and all(np.all(np.isfinite(v)) for v in flat(grads).values())
        assert all(np.isfinite(float(v)) for v in metrics.values())
        if not kp.any():
            assert float(loss) == 0.0 and float(metrics["weight_sum"]) == 0.0


# ---- 3. spec §8.5 train/infer consistency ----------------------------------------------------------------------
def test_train_infer_consistency_empty_cache(drafts, batch):
    """Training block hidden states == block_hidden over context 0..a-1 + [x_a, MASK..] at a..a+Bs-1. The
    backbone is the same code for every head type, so one draft suffices."""
    d = drafts["vanilla"]
    anchors = jnp.array([[0, 5, 8], [1, 6, 11]])
    out = fwd(d, batch, anchors, jnp.ones((2, 3), bool))
    for n in range(N):
        a = anchors[:, n]          # ragged over the batch; the pending rows past a (later taps) must be ignored
        cache = d.init_cache(2, 16)
        hid, new_cache = block_hidden(d, cache, batch["target_hidden"][:, :11], a, rows(batch["input_ids"], a))
        assert new_cache.lengths.tolist() == a.tolist()
        np.testing.assert_allclose(hid, out.draft_hidden[:, n], **TOL, err_msg=f"anchors {a.tolist()}")


def test_train_infer_consistency_incremental_cache(drafts, batch):
    """The context arrives through the cache over 3 rounds with ragged per-row counts (one of them 0) and junk
    padding rows; every round's block equals the training block at anchor = that round's start."""
    assert_rounds_match(drafts["vanilla"], batch, TOL)


# ---- 4. spec §8.6 positions and labels ------------------------------------------------------------------------
def test_labels_and_aligned_target_distribution(drafts, batch, anchors_keep):
    d = drafts["vanilla"]
    anchors, keep = anchors_keep                       # [[1,5,10],[2,6,dummy]]
    out = fwd(d, batch, anchors, keep)
    ids, s = np.asarray(batch["input_ids"]), 12
    target_logits = np.asarray(batch["logits"])        # the target's own logits, lm_head(last_hidden)
    a_np, kp = np.asarray(anchors), np.asarray(keep)
    for b, n, k in itertools.product(range(2), range(N), range(BS)):
        if kp[b, n]:
            lab = a_np[b, n] + k + 1
            safe = min(lab, s - 1)                      # clamp near the end: the last token repeats
            src = safe - 1                              # = a+k while the label is in range
            assert src == a_np[b, n] + k or lab >= s
        else:
            safe, src = 0, 0                            # dummies: label index 0
        assert int(out.target_ids[b, n, k]) == ids[b, safe], (b, n, k)
        np.testing.assert_allclose(out.target_logits[b, n, k], target_logits[b, src], **TOL, err_msg=str((b, n, k)))
        np.testing.assert_allclose(out.target_hidden[b, n, k], batch["target_last_hidden"][b, src], **TOL)
    # row 0: a=10 has labels 11, 12(>=S) ...; row 1 loss mask [0,0,1,1,1,0,1,1,1,1,1,0]: a=2 -> labels 3,4,5,6
    # with mask 1,1,0,1 -> the gap cuts off the rest of the block; the dummy is all zero
    want = [[[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]],
            [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]]
    np.testing.assert_array_equal(out.eval_mask, want)
    # teacher-forced prev tokens: [x_a, x_{a+1}, ..]; dummies use input_ids[0] (spec §10). Vanilla: u = W1[prev]
    w1 = np.asarray(d.markov_head.markov_w1[...])
    for b, n in itertools.product(range(2), range(N)):
        prev = [ids[b, a_np[b, n]]] + list(np.asarray(out.target_ids[b, n, :-1])) if kp[b, n] else [ids[b, 0]] * BS
        np.testing.assert_allclose(out.markov_u[b, n], w1[prev], **TOL, err_msg=str((b, n)))
    base = d.base_logits(out.draft_hidden)
    np.testing.assert_allclose(out.draft_logits, base + d.markov_head.bias(out.markov_u), **TOL)


# ---- 5. spec §8.8 Markov consistency ---------------------------------------------------------------------------
def _sequential_logits(d, hidden, prev0, tokens):
    """Replays the sampler's scan: slot k uses prev = prev0 (k=0) or tokens[:, k-1], state carried (rnn)."""
    base = d.base_logits(hidden)
    head = d.markov_head
    prev, state, outs = prev0, jnp.zeros((hidden.shape[0], R), hidden.dtype), []
    for k in range(hidden.shape[1]):
        u, state = head.step(hidden[:, k], prev, state)
        outs.append(base[:, k] + head.bias(u))
        prev = tokens[:, k]
    return jnp.stack(outs, 1)


@pytest.mark.parametrize("kind", MARKOV_KINDS)
def test_markov_and_confidence_heads_follow_the_spec_formulas(kind, drafts):
    """Spec §1.6-1.7 in numpy (the consistency tests below cannot see a formula error shared by both paths):
    vanilla W2·W1[prev]; gated W2(σ(gate_proj([h; W1[prev]])) ⊙ W1[prev]); rnn z=[s; W1[prev]; h] ->
    (g, c, o), s' = σ(g)s + (1-σ(g))tanh(c), bias W2 tanh(o), s_0 = 0; confidence proj([h; W1[prev]])."""
    d = drafts[kind]
    head = d.markov_head
    hidden = jnp.asarray(np.random.default_rng(11).standard_normal((2, BS, H), np.float32))
    prev = jnp.array([[3, 30, 3, 0], [31, 7, 7, 12]])
    w1, w2 = np.asarray(head.markov_w1[...], np.float64), np.asarray(head.markov_w2[...], np.float64)
    lin = lambda m, x: x @ np.asarray(m.kernel[...], np.float64) + np.asarray(m.bias[...], np.float64)
    sig = lambda x: 1 / (1 + np.exp(-x))
    h, e = np.asarray(hidden, np.float64), w1[np.asarray(prev)]
    if kind == "vanilla":
        u = e
    elif kind == "gated":
        u = sig(lin(head.gate_proj, np.concatenate([h, e], -1))) * e
    else:
        s, us = np.zeros((2, R)), []
        for k in range(BS):
            g, c, o = np.split(lin(head.joint_proj, np.concatenate([s, e[:, k], h[:, k]], -1)), 3, axis=-1)
            s = sig(g) * s + (1 - sig(g)) * np.tanh(c)
            us.append(np.tanh(o))
        u = np.stack(us, 1)
    got_u = head.teacher_forced(hidden, prev)
    np.testing.assert_allclose(got_u, u, **TOL)
    np.testing.assert_allclose(head.bias(got_u), u @ w2.T, **TOL)
    conf = lin(d.confidence_head.proj, np.concatenate([h, e], -1))[..., 0]
    np.testing.assert_allclose(d.confidence(hidden, prev), conf, **TOL)


@pytest.mark.parametrize("kind", MARKOV_KINDS)
def test_teacher_forced_logits_equal_sequential_replay(kind, drafts, batch, anchors_keep):
    d = drafts[kind]
    anchors, keep = anchors_keep
    out = fwd(d, batch, anchors, keep)
    for n in range(N):
        a = anchors[:, n]
        seq = _sequential_logits(d, out.draft_hidden[:, n], rows(batch["input_ids"], a), out.target_ids[:, n])
        kept = np.asarray(keep[:, n])                   # dummies use prev input_ids[0], not the anchor 0's token
        np.testing.assert_allclose(np.asarray(out.draft_logits[:, n])[kept], np.asarray(seq)[kept], **TOL)


@pytest.mark.parametrize("kind", MARKOV_KINDS)
def test_propose_logits_follow_the_sampled_tokens(kind, drafts, batch):
    """Sampling at T=1: propose's corrected logits at slot k are base + bias(step(prev = token sampled at k-1))
    and its confidence uses the same prev; the sampled tokens are not all argmax (so prev really is the sample)."""
    d = drafts[kind]
    counts = jnp.array([5, 3])
    anchor = rows(batch["input_ids"], counts)
    prop = propose(d, d.init_cache(2, 16), batch["target_hidden"][:, :5], counts, anchor, jax.random.key(5), SAMPLED)
    np.testing.assert_allclose(prop.logits, _sequential_logits(d, prop.block_hidden, anchor, prop.tokens), **TOL)
    prevs = jnp.concatenate([anchor[:, None], prop.tokens[:, :-1]], 1)
    np.testing.assert_allclose(prop.confidence_logits, d.confidence(prop.block_hidden, prevs), **TOL)
    assert np.any(np.asarray(prop.tokens) != np.asarray(prop.logits.argmax(-1)))


@pytest.mark.parametrize("kind", ("vanilla", "dflash"))
def test_decode_head_gives_the_same_proposal(kind, drafts, batch):
    """The decode loop contracts base logits against ``decode_head()`` (lm_head laid out [H, V], made once per
    loop): same tokens and logits as against lm_head [V, H], and the copy is the exact transpose."""
    d = drafts[kind]
    np.testing.assert_array_equal(np.asarray(d.decode_head()), np.asarray(d.lm_head[...]).T)
    counts = jnp.array([5, 3])
    anchor = rows(batch["input_ids"], counts)
    args = (d, d.init_cache(2, 16), batch["target_hidden"][:, :5], counts, anchor, jax.random.key(5), SAMPLED)
    a, b = propose(*args), propose(*args, with_decode_head=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(a.logits, b.logits, **TOL)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forced_proposal_equals_teacher_forced_block(kind, drafts, batch, tiny_target, run_target):
    """End to end: make the (sampled, T=1) proposal the ground truth (ids after the anchor := proposed tokens);
    the training forward at that anchor then reproduces propose's hidden states, corrected logits and confidence,
    i.e. teacher forcing == the sequential sampler when the samples are the teacher tokens (rnn state included)."""
    d = drafts[kind]
    prop, taps1, starts = assert_forced_block_matches(d, kind, batch, run_target, tiny_target, TOL)
    for b in range(2):                                   # causal target: the context rows did not move
        np.testing.assert_allclose(taps1[b, :starts[b]], batch["target_hidden"][b, :starts[b]], **TOL)
    if kind == "dflash":
        np.testing.assert_allclose(prop.logits, d.base_logits(prop.block_hidden), **TOL)
    assert prop.cache.lengths.tolist() == starts.tolist()


# ---- 6. spec §8.7 anchor sampling ------------------------------------------------------------------------------
def _valid(lm):
    lm = np.asarray(lm, bool)
    return np.concatenate([lm[:, :-1] & lm[:, 1:], np.zeros((lm.shape[0], 1), bool)], 1)


@pytest.mark.parametrize("num_anchors", [3, 8])
def test_sample_anchors_rules(num_anchors):
    lm = jnp.array([[0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1],     # valid 1,2,5,8,9,10
                    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],     # valid 0
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],     # none (a lone last token is not an anchor)
                    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])    # valid 0..10
    valid = _valid(lm)
    sample = jax.jit(sample_anchors, static_argnums=1)
    for seed in range(5):
        anchors, keep = (np.asarray(x) for x in sample(lm, num_anchors, jax.random.key(seed)))
        assert anchors.shape == keep.shape == (4, num_anchors)
        for b in range(4):
            k = min(int(valid[b].sum()), num_anchors)
            np.testing.assert_array_equal(keep[b], np.arange(num_anchors) < k)
            kept = anchors[b, :k]
            assert valid[b, kept].all(), kept                          # loss_mask[a] = loss_mask[a+1] = 1
            assert np.all(np.diff(kept) > 0), kept                     # unique, ascending
            assert not anchors[b, k:].any()                            # dummies at 0
        if num_anchors == 8:                                           # #valid <= N: every valid position
            np.testing.assert_array_equal(anchors[0], [1, 2, 5, 8, 9, 10, 0, 0])
    # fewer positions than anchors
    anchors, keep = sample_anchors(jnp.ones((1, 5), jnp.int32), 8, jax.random.key(0))
    assert anchors.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0]] and keep.tolist() == [[True] * 4 + [False] * 4]


def test_sampled_anchors_give_valid_blocks(drafts, batch):
    """Through train_forward: kept blocks supervise slot 0; dummies have an all-zero eval_mask; 0/1 prefixes."""
    for seed in range(3):
        anchors, keep = sample_anchors(batch["loss_mask"], N, jax.random.key(seed))
        out = fwd(drafts["dflash"], batch, anchors, keep)
        em = np.asarray(out.eval_mask)
        np.testing.assert_array_equal(em[..., 0], np.asarray(keep))
        assert set(np.unique(em)) <= {0.0, 1.0} and np.all(np.diff(em, axis=-1) <= 0)
        assert not em[~np.asarray(keep)].any()


def test_sample_anchors_are_uniform():
    """7 valid positions, N=3, 7000 draws. (a) Every 3-subset is equally likely: chi-square over the 35 subsets.
    (b) Each valid position has marginal frequency N/#valid = 3/7: chi-square with the without-replacement
    covariance (df = #valid - 1). Both at significance 1e-3 (fixed keys, so the outcome is deterministic)."""
    lm = jnp.array([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0]])
    valid_pos = np.flatnonzero(_valid(lm)[0])
    m, n, draws = len(valid_pos), 3, 7000
    assert m == 7
    anchors, keep = jax.jit(jax.vmap(lambda k: sample_anchors(lm, n, k)))(jax.random.split(jax.random.key(42), draws))
    anchors, keep = np.asarray(anchors)[:, 0], np.asarray(keep)[:, 0]
    assert keep.all() and np.isin(anchors, valid_pos).all()
    subsets = {s: i for i, s in enumerate(itertools.combinations(valid_pos.tolist(), n))}
    counts = np.bincount([subsets[tuple(a)] for a in anchors.tolist()], minlength=len(subsets))
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    freq = np.array([(anchors == p).sum() for p in valid_pos])
    p = n / m
    stat = np.sum((freq - draws * p) ** 2) / (draws * p * (1 - p) * m / (m - 1))
    assert stats.chi2.sf(stat, m - 1) > 1e-3, freq / draws


# ---- 7. spec §8.9 confidence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MARKOV_KINDS)
def test_confidence_is_non_anticipating(kind, drafts, batch):
    """c_k depends on x_{a+k} (its prev token) but not on x_{a+k+1} (its own label) or anything later."""
    d = drafts[kind]
    anchors, keep = jnp.array([[1, 6, 0], [2, 7, 0]]), jnp.array([[True, True, False], [True, True, False]])
    ids = np.asarray(batch["input_ids"])
    base = np.asarray(fwd(d, batch, anchors, keep).confidence_logits[0, 0])      # row 0, a = 1
    a = 1
    for k in range(BS):
        changed = ids.copy()
        changed[0, a + k + 1] = (changed[0, a + k + 1] + 7) % MASK               # the label at slot k
        conf = np.asarray(fwd(d, dict(batch, input_ids=jnp.asarray(changed)), anchors, keep).confidence_logits[0, 0])
        np.testing.assert_array_equal(conf[:k + 1], base[:k + 1], err_msg=f"label of slot {k} leaked")
        if k + 1 < BS:                                                            # ... it is slot k+1's prev
            assert abs(conf[k + 1] - base[k + 1]) > 1e-4, k


@functools.partial(jax.jit, static_argnums=1)
def _dloss_dconf(outputs, config):
    return jax.grad(lambda z: dspark_loss(dataclasses.replace(outputs, confidence_logits=z), config)[0])(
        outputs.confidence_logits)


def _bce_targets(outputs, config):
    """Recovers the BCE soft target c* per weighted slot from d loss / d z = a_conf * w * (sigmoid(z) - c*) / Wsum."""
    z = outputs.confidence_logits
    g = _dloss_dconf(outputs, config)
    w = np.asarray(slot_weights(outputs.eval_mask, config), np.float64)
    on = w > 0
    c = np.asarray(jax.nn.sigmoid(z), np.float64) - np.asarray(g, np.float64) * (w.sum() + 1e-6) / (
        config.loss_alphas[2] * np.where(on, w, 1.0))
    return c, on


def test_bce_target_is_clipped_half_l1_and_one_when_distributions_match(drafts, batch, anchors_keep):
    d = drafts["vanilla"]
    cfg = d.config
    out = fwd(d, batch, *anchors_keep)
    _, l1 = slot_ce_l1_reference(out.draft_logits, out.target_logits, out.target_ids)
    c, on = _bce_targets(out, cfg)
    assert on.sum() == 15
    assert np.all(c[on] >= -1e-5) and np.all(c[on] <= 1 + 1e-5)
    np.testing.assert_allclose(c[on], np.clip(1 - 0.5 * np.asarray(l1), 0, 1)[on], atol=2e-5)
    # p_d == p_t: the target is exactly 1 and so is every accept rate
    same = dataclasses.replace(out, target_logits=out.draft_logits)
    c, on = _bce_targets(same, cfg)
    np.testing.assert_allclose(c[on], 1.0, atol=2e-5)
    _, metrics = dspark_loss(same, cfg)
    for k in range(BS):
        assert float(metrics[f"accept_rate@{k}"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["tau_probabilistic"]) == pytest.approx(1 + np.mean([4, 4, 1, 2, 4]), abs=1e-5)
    # nearly disjoint distributions: L1 -> 2, target -> 0, never below
    far = dataclasses.replace(out, target_logits=-60.0 * out.draft_logits, draft_logits=60.0 * out.draft_logits)
    c, on = _bce_targets(far, cfg)
    assert np.all(c[on] >= -2e-5) and np.all(c[on] < 0.05)


def test_bce_gradients_reach_backbone_and_w1(drafts, batch, anchors_keep):
    d = drafts["vanilla"]
    bce_only = d.config.replace(ce_loss_alpha=0.0, l1_loss_alpha=0.0)
    assert bce_only.loss_alphas == (0.0, 0.0, 1.0)
    _, _, grads = loss_and_grads(d, batch, *anchors_keep, config=bce_only)
    g = flat(grads)
    assert "embed_tokens" not in g and "lm_head" not in g                      # frozen: not differentiated
    for name in ("layers.0.self_attn.q_proj.kernel", "layers.1.mlp.down_proj.kernel", "fc.kernel",
                 "markov_head.markov_w1", "confidence_head.proj.kernel"):
        assert np.abs(g[name]).max() > 1e-6, name
    # the soft target is stop-gradient: nothing flows into W2 (used only by the logits)
    assert not np.any(g["markov_head.markov_w2"])
    # conversely CE + L1 never reach the confidence head: the full loss (0.1 CE + 0.9 L1 + 1.0 BCE) gives it
    # exactly the BCE-only gradient, while W2 does get CE/L1 gradient
    full = flat(loss_and_grads(d, batch, *anchors_keep)[2])
    for name in ("confidence_head.proj.kernel", "confidence_head.proj.bias"):
        np.testing.assert_allclose(full[name], g[name], atol=1e-7, rtol=1e-6, err_msg=name)
    assert np.abs(full["markov_head.markov_w2"]).max() > 1e-6


# ---- 8. spec §8.10 loss numerics -------------------------------------------------------------------------------
def test_slot_weights(drafts):
    cfg = drafts["vanilla"].config
    mask = jnp.array([[[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]], jnp.float32)
    w = np.asarray(slot_weights(mask, cfg))
    np.testing.assert_allclose(w[0, 0], [1.0, 0.7788008, 0.6065307, 0.4723666], rtol=1e-6)
    np.testing.assert_allclose(w, np.asarray(mask) * np.exp(-np.arange(4) / 4.0), rtol=1e-6)
    w2 = np.asarray(slot_weights(mask, cfg.replace(loss_decay_gamma=2.0)))
    np.testing.assert_allclose(w2, np.asarray(mask) * np.exp(-np.arange(4) / 2.0), rtol=1e-6)


@pytest.mark.parametrize("kind", ["vanilla", "dflash"])
def test_loss_and_metrics_by_hand(kind, drafts, batch, anchors_keep):
    """Spec §3.4 / §3.6 in float64 numpy from the materialised outputs; DFlash is pure weighted CE."""
    d = drafts[kind]
    out = fwd(d, batch, *anchors_keep)
    loss, metrics = dspark_loss(out, d.config)
    pd, pt = np_softmax(out.draft_logits), np_softmax(out.target_logits)
    tid = np.asarray(out.target_ids)
    ce = -np.log(np.take_along_axis(pd, tid[..., None], -1)[..., 0])
    l1 = np.abs(pd - pt).sum(-1)
    assert np.all(l1 >= 0) and np.all(l1 <= 2)
    mask = np.asarray(out.eval_mask, np.float64)
    w = mask * np.exp(-np.arange(BS) / 4.0)
    acc = np.clip(1 - 0.5 * l1, 0, 1)
    if kind == "dflash":
        want = np.sum(w * ce) / (w.sum() + 1e-6)
    else:
        z = np.asarray(out.confidence_logits, np.float64)
        bce = np.logaddexp(0, z) - acc * z
        want = (0.1 * np.sum(w * ce) + 0.9 * np.sum(w * l1) + 1.0 * np.sum(w * bce)) / (w.sum() + 1e-6)
        assert float(metrics["bce"]) == pytest.approx(np.sum(w * bce) / w.sum(), rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["ce"]) == pytest.approx(np.sum(w * ce) / w.sum(), rel=1e-5)
    assert float(metrics["l1"]) == pytest.approx(np.sum(w * l1) / w.sum(), rel=1e-5)
    assert float(metrics["weight_sum"]) == pytest.approx(w.sum(), rel=1e-6)
    for k in range(BS):
        assert float(metrics[f"accept_rate@{k}"]) == pytest.approx(
            np.sum(acc[..., k] * mask[..., k]) / mask[..., k].sum(), rel=1e-5)
    blocks = mask[..., 0] > 0
    tau = 1 + np.cumprod(acc * mask, -1).sum(-1)
    assert float(metrics["tau_probabilistic"]) == pytest.approx(tau[blocks].mean(), rel=1e-5)


def test_l1_is_bounded():
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(40.0 * rng.standard_normal((2, 3, 4, V), np.float32)) for _ in range(2))  # ~one-hot
    ids = jnp.zeros((2, 3, 4), jnp.int32)
    _, l1 = slot_ce_l1_reference(x, y, ids)
    assert np.all(np.asarray(l1) >= 0) and np.all(np.asarray(l1) <= 2 + 1e-6) and np.asarray(l1).max() > 1.9
    _, l1_same = slot_ce_l1_reference(x, x, ids)
    np.testing.assert_allclose(l1_same, 0, atol=1e-6)


def test_loss_invariant_to_right_padding_and_dummy_blocks(drafts, batch, anchors_keep):
    """Right-padding the sequence (ids/loss_mask 0, features junk) and appending dummy blocks (anchor 0, keep
    False) change neither the loss, nor any metric, nor any gradient. (One compiled case with both, to keep the
    file fast; the dropped-block test above covers dummies alone.)"""
    d = drafts["vanilla"]
    anchors, keep = anchors_keep
    pad = 4
    junk = jnp.asarray(10.0 * np.random.default_rng(9).standard_normal((2, pad, 48 + 16), np.float32))
    padded = dict(input_ids=jnp.pad(batch["input_ids"], ((0, 0), (0, pad))),
                  loss_mask=jnp.pad(batch["loss_mask"], ((0, 0), (0, pad))),
                  target_hidden=jnp.concatenate([batch["target_hidden"], junk[..., :48]], 1),
                  target_last_hidden=jnp.concatenate([batch["target_last_hidden"], junk[..., 48:]], 1))
    more_a = jnp.concatenate([anchors, jnp.zeros((2, 2), jnp.int32)], 1)
    more_k = jnp.concatenate([keep, jnp.zeros((2, 2), bool)], 1)
    l0, m0, g0 = loss_and_grads(d, batch, anchors, keep)
    l1, m1, g1 = loss_and_grads(d, padded, more_a, more_k)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for k in m0:
        assert float(m1[k]) == pytest.approx(float(m0[k]), rel=1e-5, abs=1e-6), k
    g0, g1 = flat(g0), flat(g1)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], atol=1e-6, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind,chunk", [("vanilla", 5), ("dflash", 8)])   # with / without Markov u
def test_chunked_vocab_matches_reference(kind, chunk, drafts, batch, anchors_keep):
    """Loss, every metric and every gradient agree between materialised logits and vocab chunks (5 does not
    divide V=32; see also the padded-vocab test below)."""
    d = drafts[kind]
    l_ref, m_ref, g_ref = loss_and_grads(d, batch, *anchors_keep)
    g_ref = flat(g_ref)
    l, m, g = loss_and_grads(d, batch, *anchors_keep, vocab_chunk=chunk)
    assert float(l) == pytest.approx(float(l_ref), rel=1e-5, abs=1e-6)
    assert m.keys() == m_ref.keys()
    for k in m_ref:
        assert float(m[k]) == pytest.approx(float(m_ref[k]), rel=1e-5, abs=1e-5), k
    g = flat(g)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        np.testing.assert_allclose(g[k], g_ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_chunked_reduction_with_vocab_padding():
    """A vocab (37, prime) with no divisor near the chunk: the last chunk is padded; values and gradients
    (draft hidden states, Markov u, W2) still match the reference."""
    vocab, r = 37, 4
    rng = np.random.default_rng(4)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    hd, ht, u = normal(2, 3, 4, H), normal(2, 3, 4, H), normal(2, 3, 4, r)
    head, w2 = 0.5 * normal(vocab, H), 0.5 * normal(vocab, r)
    ids = jnp.asarray(rng.integers(0, vocab, (2, 3, 4)), jnp.int32)
    coef = jnp.linspace(0.5, 1.5, 24).reshape(2, 3, 4)

    def ref(hd, ht, u, head, w2):
        dl = jnp.einsum("...h,vh->...v", hd, head) + jnp.einsum("...r,vr->...v", u, w2)
        ce, l1 = slot_ce_l1_reference(dl, jnp.einsum("...h,vh->...v", ht, head), ids)
        return jnp.sum(coef * ce) + jnp.sum(coef * coef * l1)

    def chunked(hd, ht, u, head, w2):
        ce, l1 = slot_ce_l1_chunked(hd, ht, u, head, w2, ids, 10)
        return jnp.sum(coef * ce) + jnp.sum(coef * coef * l1)

    @jax.jit
    def both(*args):          # the gradients training needs: draft hidden, Markov u, W2 (lm_head is frozen)
        return (jax.value_and_grad(ref, argnums=(0, 2, 4))(*args),
                jax.value_and_grad(chunked, argnums=(0, 2, 4))(*args))

    (v_ref, g_ref), (v, g) = both(hd, ht, u, head, w2)
    assert float(v) == pytest.approx(float(v_ref), rel=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# ---- 9. spec §8.11 frozen parameters ---------------------------------------------------------------------------
@nnx.jit
def _apply_update(optimizer, model, grads):
    optimizer.update(model, grads)


def test_frozen_embed_and_head_through_training(tiny_target, tiny_configs, batch, anchors_keep):
    _, draft_config = tiny_configs
    d = build_draft(tiny_target, draft_config("vanilla"), seed=3)
    embed = np.asarray(tiny_target.embed_tokens.embedding[...])
    head = np.asarray(tiny_target.lm_head.kernel[...]).T
    np.testing.assert_array_equal(d.embed_tokens[...], embed)
    np.testing.assert_array_equal(d.lm_head[...], head)
    before = flat(nnx.state(d, nnx.Param))
    opt = nnx.Optimizer(d, optax.adamw(1e-2), wrt=nnx.Param)

    losses = []
    for _ in range(3):
        loss, _, grads = loss_and_grads(d, batch, *anchors_keep)
        assert "embed_tokens" not in flat(grads) and "lm_head" not in flat(grads)
        _apply_update(opt, d, grads)
        losses.append(float(loss))
    np.testing.assert_array_equal(d.embed_tokens[...], embed)           # bit-identical
    np.testing.assert_array_equal(d.lm_head[...], head)
    opt_paths = list(flat(nnx.state(opt)).keys())
    assert any(".fc.kernel" in p for p in opt_paths)
    assert not [p for p in opt_paths if "embed_tokens" in p or "lm_head" in p], opt_paths
    after = flat(nnx.state(d, nnx.Param))
    assert after.keys() == before.keys() and "embed_tokens" not in after
    for k in ("fc.kernel", "layers.0.self_attn.q_proj.kernel", "markov_head.markov_w1", "confidence_head.proj.bias"):
        assert np.abs(after[k] - before[k]).max() > 1e-4, k
    assert losses[-1] < losses[0]


# ---- 10. bad input ---------------------------------------------------------------------------------------------
def test_bad_config_is_a_config_error(tiny_target, tiny_configs):
    _, draft_config = tiny_configs
    for ids in ((0, 1, 3), (0, 1, 4), (2, 7)):              # 3 = the last layer of a 4-layer target; beyond
        with pytest.raises(ConfigError, match="target_layer_ids"):
            build_draft(tiny_target, draft_config(target_layer_ids=ids))
    for mask_id in (32, 100, -1):
        with pytest.raises(ConfigError, match="mask_token_id"):
            build_draft(tiny_target, draft_config(mask_token_id=mask_id))
    with pytest.raises(ConfigError, match="markov_head_type"):
        draft_config(markov_head_type="lstm")


def test_bad_shapes_are_value_errors(drafts, batch, anchors_keep):
    d = drafts["vanilla"]
    anchors, keep = anchors_keep
    ids, lm, taps, last = (batch[k] for k in ("input_ids", "loss_mask", "target_hidden", "target_last_hidden"))
    with pytest.raises(ValueError, match=r"target_hidden.*\(2, 12, 32\).*\(2, 12, 48\)"):
        d.train_forward(ids, lm, taps[..., :32], last, anchors, keep)
    with pytest.raises(ValueError, match=r"target_last_hidden.*\(2, 12, 8\)"):
        d.train_forward(ids, lm, taps, last[..., :8], anchors, keep)
    with pytest.raises(ValueError, match=r"loss_mask.*\(2, 11\)"):
        d.train_forward(ids, lm[:, :11], taps, last, anchors, keep)
    with pytest.raises(ValueError, match=r"block_keep.*\(2, 2\)"):
        d.train_forward(ids, lm, taps, last, anchors, keep[:, :2])
    with pytest.raises(ValueError, match="width 32"):
        d.block_hidden(d.init_cache(2, 16), taps[:, :4, :32], jnp.array([4, 4]), ids[:, 4])
    with pytest.raises(ValueError, match="capacity"):
        d.block_hidden(d.init_cache(2, 3), taps[:, :4], jnp.array([4, 4]), ids[:, 4])
