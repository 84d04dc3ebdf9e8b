"""The jitted train step (dspark_jax/train/step.py) and the lr schedule / optimizer (train/schedule.py).

Spec tiny config (§7; initializer_range 0.2): target V=32, H=16, nh/nkv/hd 2/1/8, I=32, 4 layers; DSpark draft
taps [0,1,2], D=2, Bs=4, N=3, r=4, mask id 31. Batch: 8 sequences of 16 tokens with varied loss masks (prompts
of different lengths, gaps between assistant turns, right padding, one row with no supervised token).
Everything fp32. Checks: one step agrees across meshes (1 device, data=8, data=2 x fsdp=2 x tensor=2) and keeps
the state on its logical-axis shardings; frozen arrays stay bit-identical and have no optimizer state; the loss
falls when overfitting one batch (with gradient accumulation); DFlash (chunked loss, sharded) and Eagle3 steps
run; spec §8.14 lr values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dspark_jax.config import TargetConfig
from dspark_jax.drafts.build import build_draft
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.nn.frozen import Frozen
from dspark_jax.sharding import make_mesh
from dspark_jax.targets import build_target
from dspark_jax.train.schedule import dspark_lr_schedule, make_optimizer, optimizer_update_count, warmup_steps
from dspark_jax.train.step import (
    init_train_state,
    logical_shardings,
    make_train_step,
    shard_target_state,
    shard_train_state,
)

V, MASK_ID, B, S = 32, 31, 8, 16
# CPU compile time dominates these tests; these options cut it ~3x (numerics are still IEEE fp32)
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
MESHES = {"1dev": {}, "data8": {"data": 8}, "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2}}
# one step is compared across meshes at 1e-5: Adam's first update is lr * g / (|g| + eps), which turns
# reduction-order noise in a near-zero gradient into a visible change, so keep that lr realistic (2.5e-4)
PEAK_LR, TOTAL = 1e-3, 100
# overfitting one batch wants a large rate
FIT_PEAK_LR, FIT_STEPS = 3e-2, 20


def tiny_target(num_layers: int = 4, seed: int = 0):
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       initializer_range=0.2)
    return build_target(cfg, dtype="float32", seed=seed)


def tiny_draft(target, kind: str = "dspark", seed: int = 1):
    if kind == "eagle3":
        cfg = DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4), num_draft_layers=1,
                          ttt_length=3, dtype="float32")
    else:
        cfg = DraftConfig(block_size=4, mask_token_id=MASK_ID, target_layer_ids=(0, 1, 2), num_anchors=3,
                          num_draft_layers=2, markov_rank=4, markov_head_type="vanilla",
                          enable_confidence_head=True, dtype="float32")
        if kind == "dflash":
            cfg = cfg.replace(markov_rank=0, enable_confidence_head=False)
    return build_draft(target, cfg, seed=seed)


# supervised spans per row ([start, end) in tokens); row length = last end (rest is right padding)
SPANS = [[(3, 16)], [(5, 12)], [(2, 7), (10, 16)], [(8, 16)], [(1, 16)], [], [(4, 9), (11, 14)], [(6, 15)]]
LENGTHS = [16, 12, 16, 16, 16, 10, 14, 15]


def make_batch(seed: int = 0, with_attention_mask: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, MASK_ID, (B, S)).astype(np.int32)
    loss_mask = np.zeros((B, S), np.int32)
    attention_mask = np.zeros((B, S), np.int32)
    for row, (spans, length) in enumerate(zip(SPANS, LENGTHS)):
        for a, b in spans:
            loss_mask[row, a:b] = 1
        ids[row, length:] = 0
        attention_mask[row, :length] = 1
    batch = {"input_ids": ids, "loss_mask": loss_mask}
    if with_attention_mask:
        batch["attention_mask"] = attention_mask
    return batch


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def mesh_of(name):
    return make_mesh(MESHES[name], devices=jax.devices()[:1] if name == "1dev" else None)


@pytest.fixture(scope="module")
def models():
    target = tiny_target()
    return target, tiny_draft(target)


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(PEAK_LR, TOTAL)


@pytest.fixture(scope="module")
def one_step(models, optimizer):
    """mesh name -> (mesh, step_fn, state after one step, metrics); the same draft init and batch everywhere."""
    target, draft = models
    batch = make_batch()
    out = {}
    for name in MESHES:
        mesh = mesh_of(name)
        fn = make_train_step(target, draft, optimizer, mesh=mesh, lr_schedule=dspark_lr_schedule(PEAK_LR, TOTAL),
                             compiler_options=FAST_COMPILE)
        state = shard_train_state(init_train_state(draft, optimizer, seed=0), mesh)
        target_state = shard_target_state(nnx.split(target)[1], mesh)
        new_state, metrics = fn(state, target_state, batch)
        out[name] = (mesh, fn, target_state, new_state, host(metrics))
    return out


def test_one_step_same_on_every_mesh(one_step):
    ref_state, ref_metrics = one_step["1dev"][3], one_step["1dev"][4]
    assert np.isfinite(ref_metrics["loss"]) and ref_metrics["loss"] > 0
    assert ref_metrics["grad_norm"] > 0
    assert ref_metrics["lr"] == pytest.approx(PEAK_LR / warmup_steps(TOTAL), rel=1e-6)
    assert ref_metrics["anchors_per_seq"] == pytest.approx(21 / 8)  # 3 anchors on 7 rows, none on the empty one
    ref = host(ref_state)
    for name in ("data8", "d2f2t2"):
        state, metrics = one_step[name][3], one_step[name][4]
        for k, v in ref_metrics.items():
            np.testing.assert_allclose(metrics[k], v, atol=1e-5, rtol=1e-5, err_msg=f"{name}: metric {k}")
        got = host(state)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref.params), jax.tree.leaves(got.params)):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=f"{name}: {jax.tree_util.keystr(path)}")
        assert int(got.step) == 1


def test_state_stays_on_logical_shardings(one_step, models):
    mesh, _, target_state, state, _ = one_step["d2f2t2"]
    want = logical_shardings(state, mesh)
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(sh, x.ndim), jax.tree_util.keystr(path)
    # spot checks of the rules: embed -> fsdp, vocab/heads/mlp -> tensor, norms and scalars replicated
    assert state.params["fc"]["kernel"][...].sharding.spec == P(None, "fsdp")
    assert state.frozen["lm_head"][...].sharding.spec == P("tensor", "fsdp")
    assert state.params["layers"][0]["mlp"]["gate_proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert state.params["norm"]["weight"][...].sharding.spec == P()
    assert state.step.sharding.spec == P()
    assert target_state["embed_tokens"]["embedding"][...].sharding.spec == P("tensor", "fsdp")


def test_frozen_bit_identical_and_not_in_optimizer(one_step, models, optimizer):
    target, draft = models
    _, fn, target_state, state, _ = one_step["1dev"]
    state = jax.tree.map(jnp.copy, state)  # fn donates its input
    before = host(state.params)
    for _ in range(2):
        state, _ = fn(state, target_state, make_batch())
    assert int(state.step) == 3
    # spec §8.11: the copied embed / lm_head equal the target's tensors bit for bit after N steps
    np.testing.assert_array_equal(np.asarray(state.frozen["embed_tokens"][...]),
                                  np.asarray(target.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(np.asarray(state.frozen["lm_head"][...]),
                                  np.asarray(target.lm_head.kernel[...]).T)
    frozen_types = {type(v) for v in jax.tree.leaves(state.frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert frozen_types == {Frozen}
    # the trainable ones did move
    after = host(state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # no optimizer state for frozen arrays: moments are Param trees over exactly the params' paths
    opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
    assert not any("embed_tokens" in p or "lm_head" in p for p in opt_paths)
    n_params = len(jax.tree.leaves(state.params))
    n_opt_arrays = sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state))
    assert n_opt_arrays == 2 * n_params  # adam mu + nu, nothing else
    opt_vars = [v for v in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
                if isinstance(v, nnx.Variable)]
    assert opt_vars and all(type(v) is nnx.Param for v in opt_vars)
    assert int(optimizer_update_count(state.opt_state)) == 3


def test_overfit_one_batch_with_gradient_accumulation(one_step, models):
    """grad_accum=2 (each update averages two micro-steps on the same batch): the first micro-step leaves the
    params alone, the second updates them once; the accumulator is a Param tree placed like the params; and
    the loss falls when overfitting one batch."""
    target, draft = models
    mesh, _, target_state, _, _ = one_step["1dev"]
    opt = make_optimizer(FIT_PEAK_LR, FIT_STEPS, grad_accum=2)
    fn = make_train_step(target, draft, opt, mesh=mesh, lr_schedule=dspark_lr_schedule(FIT_PEAK_LR, FIT_STEPS),
                         compiler_options=FAST_COMPILE)
    state = shard_train_state(init_train_state(draft, opt, seed=0), mesh)
    batch = make_batch()
    p0 = host(state.params)
    state, metrics = fn(state, target_state, batch)
    losses = [float(metrics["loss"])]
    assert_tree_equal(host(state.params), p0)
    assert int(optimizer_update_count(state.opt_state)) == 0
    state, metrics = fn(state, target_state, batch)
    losses.append(float(metrics["loss"]))
    assert int(optimizer_update_count(state.opt_state)) == 1 and int(state.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(host(state.params))))
    assert jax.tree.structure(state.opt_state.acc_grads) == jax.tree.structure(state.params)
    for x, sh in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(logical_shardings(state.opt_state, mesh))):
        assert x.sharding.is_equivalent_to(sh, x.ndim)

    for _ in range(2 * FIT_STEPS - 2):
        state, metrics = fn(state, target_state, batch)
        losses.append(float(metrics["loss"]))
    assert int(optimizer_update_count(state.opt_state)) == FIT_STEPS
    assert all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.75 * losses[0], losses
    assert metrics["lr"] < 1e-2 * FIT_PEAK_LR  # the cosine reached ~0 at the last update


def assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_dflash_step_chunked_loss_on_mesh():
    target = tiny_target()
    draft = tiny_draft(target, "dflash")
    opt = make_optimizer(PEAK_LR, TOTAL)
    mesh = mesh_of("d2f2t2")
    fn = make_train_step(target, draft, opt, mesh=mesh, vocab_chunk=8, compiler_options=FAST_COMPILE)
    state = shard_train_state(init_train_state(draft, opt), mesh)
    before = host(state.params)
    new_state, metrics = fn(state, shard_target_state(nnx.split(target)[1], mesh), make_batch())
    metrics = host(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    # DFlash: the loss is the pure weighted CE (spec §8.10)
    np.testing.assert_allclose(metrics["loss"], metrics["ce"], rtol=1e-5)
    assert "bce" not in metrics
    after = host(new_state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_eagle3_step():
    target = tiny_target(num_layers=8)
    draft = tiny_draft(target, "eagle3")
    opt = make_optimizer(PEAK_LR, TOTAL)
    fn = make_train_step(target, draft, opt, compiler_options=FAST_COMPILE)
    state = init_train_state(draft, opt)
    before = host(state.params)
    new_state, metrics = fn(state, nnx.split(target)[1], make_batch(with_attention_mask=True))
    metrics = host(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert {"ploss_0", "ploss_1", "ploss_2", "accuracy@0", "tau_probabilistic"} <= set(metrics)
    assert metrics["grad_norm"] > 0
    after = host(new_state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    np.testing.assert_array_equal(np.asarray(new_state.frozen["lm_head"][...]),
                                  np.asarray(target.lm_head.kernel[...]).T)


# ---- schedule / optimizer (spec §3.5, §8.14) -----------------------------------------------------------------
@pytest.mark.parametrize("total", [100, 2400, 30])
def test_lr_schedule_values(total):
    peak = 6e-4
    w = int(0.04 * total)
    sched = dspark_lr_schedule(peak, total)
    assert w == warmup_steps(total)
    assert float(sched(0)) == pytest.approx(peak / w, rel=1e-6)
    assert float(sched(w - 1)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(w)) == pytest.approx(peak, rel=1e-6)
    last = peak * 0.5 * (1 + math.cos(math.pi * (total - 1 - w) / (total - w)))
    assert float(sched(total - 1)) == pytest.approx(last, rel=1e-4, abs=1e-6 * peak)
    assert float(sched(total - 1)) < 0.01 * peak
    mid = w + (total - w) // 2
    assert float(sched(mid)) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (mid - w) / (total - w))), rel=1e-5)
    assert float(sched(total + 5)) == 0.0


def test_optimizer_applies_the_schedule_per_update():
    """AdamW's first update is -lr * g/|g| (to eps): the optimizer uses lr(0) = peak/W, and with
    accumulation the schedule advances once per update, not per micro-step."""
    peak, total = 1e-2, 100
    params = {"w": jnp.zeros((3,))}
    grads = {"w": jnp.array([0.1, -0.2, 0.3])}
    tx = make_optimizer(peak, total)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -peak / 4 * np.sign(grads["w"]), rtol=1e-5)
    tx = make_optimizer(peak, total, grad_accum=2)
    st = tx.init(params)
    upd, st = tx.update(grads, st, params)
    np.testing.assert_array_equal(upd["w"], 0.0)  # first micro-step: no update yet
    upd, st = tx.update(grads, st, params)
    np.testing.assert_allclose(upd["w"], -peak / 4 * np.sign(grads["w"]), rtol=1e-5)
    assert int(optimizer_update_count(st)) == 1
    # clipping happens on the global norm before Adam (a huge gradient gives the same first step)
    tx = make_optimizer(peak, total, weight_decay=0.1)
    upd, _ = tx.update({"w": grads["w"] * 1e6}, tx.init({"w": jnp.ones((3,))}), {"w": jnp.ones((3,))})
    np.testing.assert_allclose(upd["w"], -peak / 4 * (np.sign(grads["w"]) + 0.1), rtol=1e-5)
    assert isinstance(make_optimizer(peak, total, grad_accum=4), optax.MultiSteps)
