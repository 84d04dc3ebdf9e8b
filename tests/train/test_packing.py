"""Sequence packing with an anchor budget (``data.packing``): the packer and packed batches (train/data.py),
per-segment anchor sampling (train/anchors.py), and the packed train step (train/step.py, the target's segment
mask, the draft's block mask).

Models are spec-tiny and fp32 (V=32, H=16, 4 target layers, 2 draft layers, Bs=4). Checks: a batch that packs
trivially (one conversation per row) gives the unpacked step's loss and update; in a row of two conversations
neither one's target features or draft outputs move when the other's tokens change, and each equals the
conversation run alone at positions 0.. (RoPE restarts). Exact resume with packing is in test_trainer.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.config import TargetConfig
from dspark_jax.drafts.build import build_draft
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.targets import build_target
from dspark_jax.train.anchors import sample_anchors
from dspark_jax.train.data import InputPipeline, pack_rows
from dspark_jax.train.loss import dspark_loss
from dspark_jax.train.step import target_features

V, MASK_ID, S = 32, 31, 16
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def models():
    tcfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.2)
    target = build_target(tcfg, dtype="float32", seed=0)
    dcfg = DraftConfig(block_size=4, mask_token_id=MASK_ID, target_layer_ids=(0, 1, 2), num_anchors=3,
                       num_draft_layers=2, markov_rank=4, markov_head_type="vanilla", enable_confidence_head=True,
                       dtype="float32")
    return target, build_draft(target, dcfg, seed=1)


def conversation(rng, n):
    ids = rng.integers(0, MASK_ID, n).astype(np.int32)
    mask = np.zeros(n, np.uint8)
    mask[rng.integers(1, max(2, n // 2)):] = 1          # a prompt, then the answer
    return {"input_ids": ids, "loss_mask": mask}


def test_pack_rows_and_packed_batches():
    lengths = [9, 3, 16, 7, 5, 12, 4, 1]
    plan = pack_rows(lengths, 16)
    assert sorted(np.concatenate(plan).tolist()) == list(range(8))          # every sequence exactly once
    assert all(sum(lengths[i] for i in row) <= 16 for row in plan)
    assert len(plan) == 4 == -(-sum(lengths) // 16)                           # best fit reaches the bound here
    assert [r.tolist() for r in plan] == [r.tolist() for r in pack_rows(lengths, 16)]   # deterministic
    rng = np.random.default_rng(0)
    samples = [conversation(rng, n) if n > 2 else {"input_ids": np.full(n, 5, np.int32),
                                                   "loss_mask": np.ones(n, np.uint8)} for n in lengths]
    kw = dict(global_batch_size=2, max_length=16, buckets=[16], num_threads=0, process_index=0, process_count=1,
              num_epochs=1)
    packed = InputPipeline(samples, packing=True, **kw)
    plain = InputPipeline(samples, **kw)
    assert len(packed) == 2 and len(plain) == 4      # steps of 2 rows: 4 packed rows vs 8 conversations
    seen = []
    for batch in packed.iterator():
        assert set(batch) == {"input_ids", "loss_mask", "segment_ids", "positions", "lengths"}
        for r in range(2):
            seg, pos, n = batch["segment_ids"][r], batch["positions"][r], batch["lengths"][r]
            assert np.all(seg[n:] == 0) and np.all(seg[:n] > 0) and np.all(np.diff(seg[:n]) >= 0)
            for k in np.unique(seg[:n]):
                at = np.flatnonzero(seg == k)
                np.testing.assert_array_equal(pos[at], np.arange(len(at)))
                seen.append(batch["input_ids"][r, at].tolist())
    assert sorted(seen) == sorted(s["input_ids"].tolist() for s in samples)
    assert packed.padding_fraction() < plain.padding_fraction()
    # resume state: a packed position does not resume an unpacked pipeline, nor the other way round
    state = packed.iterator().get_state()
    with pytest.raises(ValueError, match="different data set-up"):
        plain.iterator(state)
    with pytest.raises(ValueError, match="different data set-up"):
        packed.iterator(plain.iterator().get_state())


def largest_remainder(v, n):
    """Reference quotas: ``floor(n * v_k / V)``, then one more for the largest remainders (earliest first)."""
    total = max(sum(v), 1)
    q = [min(x, n * x // total) for x in v]
    left = min(sum(v), n) - sum(q)
    for k in sorted(range(len(v)), key=lambda k: (-(n * v[k] % total), k)):
        if left and q[k] < v[k]:
            q[k], left = q[k] + 1, left - 1
    return q


def test_anchor_budget_per_segment():
    rng = np.random.default_rng(1)
    lm = jnp.asarray(rng.random((3, 40)) < 0.8)
    seg = np.repeat([[1, 2, 3, 0]], 3, 0).repeat([10, 15, 12, 3], axis=1)
    key = jax.random.key(7)
    draw = jax.jit(sample_anchors, static_argnums=1, compiler_options=FAST_COMPILE)
    # one segment: exactly the unpacked draw
    a, k = draw(lm, 4, key)
    a1, k1 = draw(lm, 4, key, jnp.ones_like(seg))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k))
    valid = np.asarray(lm[:, :-1] & lm[:, 1:]) & (seg[:, :-1] == seg[:, 1:])
    valid = np.concatenate([valid, np.zeros((3, 1), bool)], 1)
    for n in (5, 64):
        a, k = map(np.asarray, draw(lm, n, key, jnp.asarray(seg)))
        for r in range(3):
            got = a[r][k[r]]
            assert np.all(valid[r, got]) and len(set(got.tolist())) == len(got) == min(valid[r].sum(), n)
            per_seg = [int(valid[r][seg[r] == s].sum()) for s in (1, 2, 3, 0)]
            drawn = [int(np.sum(seg[r, got] == s)) for s in (1, 2, 3, 0)]
            assert drawn == largest_remainder(per_seg, n), (r, n, per_seg, drawn)
            if n >= valid[r].sum():
                assert set(got.tolist()) == set(np.flatnonzero(valid[r]).tolist())


def test_trivially_packed_batch_equals_unpacked(models):
    """One conversation per row (segment 1, padding 0, positions 0..): the packed path (anchors, target
    features, draft forward, loss) gives the unpacked loss and metrics, both computed in one jitted program
    the way the train step computes them."""
    from flax import nnx

    target, draft = models
    tgraph, tstate = nnx.split(target)
    rng = np.random.default_rng(2)
    lengths = [16, 11, 9, 13]
    convs = [conversation(rng, n) for n in lengths]
    plain = {"input_ids": np.zeros((4, S), np.int32), "loss_mask": np.zeros((4, S), np.uint8)}
    for r, c in enumerate(convs):
        plain["input_ids"][r, :lengths[r]] = c["input_ids"]
        plain["loss_mask"][r, :lengths[r]] = c["loss_mask"]
    real = np.arange(S)[None] < np.asarray(lengths)[:, None]
    packed = dict(plain, segment_ids=real.astype(np.int32), positions=np.where(real, np.arange(S)[None], 0)
                  .astype(np.int32))

    def loss(batch):
        seg, pos = batch.get("segment_ids"), batch.get("positions")
        ids, lm = batch["input_ids"], batch["loss_mask"]
        anchors, keep = sample_anchors(lm, 3, jax.random.key(5), seg)
        taps, last = target_features(nnx.merge(tgraph, tstate), ids, draft.config.target_layer_ids, seg, pos)
        packing = {} if seg is None else dict(segment_ids=seg, positions=pos)
        out = draft.train_forward(ids, lm, taps, last, anchors, keep, materialize_logits=False, **packing)
        return dspark_loss(out, draft.config, vocab_chunk=None), jnp.sum(keep)

    (l_plain, m_plain), n_plain = jax.jit(loss, compiler_options=FAST_COMPILE)(plain)
    (l_packed, m_packed), n_packed = jax.jit(loss, compiler_options=FAST_COMPILE)(packed)
    assert int(n_plain) == int(n_packed) == 12
    np.testing.assert_allclose(float(l_packed), float(l_plain), rtol=1e-6)
    for k in m_plain:
        np.testing.assert_allclose(float(m_packed[k]), float(m_plain[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_segments_are_isolated(models):
    """Row = [A (7 tokens) ; B (9 tokens)]. Changing B leaves A's target features and A's blocks untouched;
    B's blocks equal B run alone from position 0 (and A's equal A alone)."""
    from flax import nnx

    target, draft = models
    tgraph, tstate = nnx.split(target)
    taps_ids = tuple(draft.config.target_layer_ids)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(ids, lm, seg, pos, anchors, keep):
        taps, last = target_features(nnx.merge(tgraph, tstate), ids, taps_ids, seg, pos)
        out = draft.train_forward(ids, lm, taps, last, anchors, keep, materialize_logits=True, segment_ids=seg,
                                  positions=pos)
        return taps, out.draft_hidden, out.draft_logits, out.confidence_logits, out.eval_mask

    rng = np.random.default_rng(3)
    a_ids, b_ids, b2_ids = (rng.integers(0, MASK_ID, n).astype(np.int32) for n in (7, 9, 9))
    ones = np.ones((1, S), np.uint8)
    two_seg = np.asarray([[1] * 7 + [2] * 9], np.int32)
    two_pos = np.asarray([list(range(7)) + list(range(9))], np.int32)
    alone_seg = lambda n: np.asarray([[1] * n + [0] * (S - n)], np.int32)         # noqa: E731
    alone_pos = lambda n: np.asarray([list(range(n)) + [0] * (S - n)], np.int32)  # noqa: E731
    keep = np.ones((1, 3), bool)
    # blocks 0, 1 anchored in A (at 1 and 4; block 1's labels would run into B), block 2 in B (at 7 + 2)
    packed = run(np.concatenate([a_ids, b_ids])[None], ones, two_seg, two_pos, np.asarray([[1, 4, 9]]), keep)
    changed = run(np.concatenate([a_ids, b2_ids])[None], ones, two_seg, two_pos, np.asarray([[1, 4, 9]]), keep)
    pad = lambda x: np.concatenate([x, np.zeros(S - len(x), np.int32)])[None]     # noqa: E731
    a_alone = run(pad(a_ids), ones, alone_seg(7), alone_pos(7), np.asarray([[1, 4, 9]]), keep)
    b_alone = run(pad(b_ids), ones, alone_seg(9), alone_pos(9), np.asarray([[0, 1, 2]]), keep)
    # target features: A's positions do not see B
    np.testing.assert_array_equal(np.asarray(packed[0])[0, :7], np.asarray(changed[0])[0, :7])
    np.testing.assert_allclose(np.asarray(packed[0])[0, :7], np.asarray(a_alone[0])[0, :7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(packed[0])[0, 7:], np.asarray(b_alone[0])[0, :9], rtol=1e-5, atol=1e-6)
    for i in range(1, 5):          # hidden, logits, confidence, eval mask of A's blocks
        np.testing.assert_array_equal(np.asarray(packed[i])[0, :2], np.asarray(changed[i])[0, :2])
        np.testing.assert_allclose(np.asarray(packed[i])[0, :2], np.asarray(a_alone[i])[0, :2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(packed[i])[0, 2], np.asarray(b_alone[i])[0, 2], rtol=1e-5, atol=1e-5)
    # block 1 (anchor 4 of A, labels 5, 6, 7.. ) stops at A's end: labels 5, 6 only
    np.testing.assert_array_equal(np.asarray(packed[4])[0, 1], [1, 1, 0, 0])
