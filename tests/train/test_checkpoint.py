"""Training checkpoints (dspark_jax/train/checkpoint.py): resume is exact, also onto another mesh; incomplete
step directories are ignored; max_to_keep / save_every; a damaged latest checkpoint falls back to the previous.

Same tiny fp32 setup as test_step.py (spec §7 config, initializer_range 0.2, 8 x 16 batches).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.config import TargetConfig
from dspark_jax.drafts.build import build_draft
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.sharding import make_mesh
from dspark_jax.targets import build_target
from dspark_jax.train.checkpoint import TrainCheckpointManager, sharded_abstract_state
from dspark_jax.train.schedule import dspark_lr_schedule, make_optimizer
from dspark_jax.train.step import (
    init_train_state,
    logical_shardings,
    make_train_step,
    shard_target_state,
    shard_train_state,
)

V, MASK_ID, B, S = 32, 31, 8, 16
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
PEAK_LR, TOTAL = 1e-3, 100
MESH_A = {"data": 2, "fsdp": 2, "tensor": 2}
MESH_B = {"fsdp": 8}  # a different shape: params sharded 8-way on embed, nothing on tensor


def make_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, MASK_ID, (B, S)).astype(np.int32)
    loss_mask = np.zeros((B, S), np.int32)
    for row in range(B):
        start = 1 + (row * 3 + seed) % 7
        loss_mask[row, start:S - row % 3] = 1
    return {"input_ids": ids, "loss_mask": loss_mask}


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_bitwise(a, b, what):
    la, lb = jax.tree_util.tree_leaves_with_path(host(a)), jax.tree.leaves(host(b))
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def assert_placed(state, mesh):
    want = jax.tree.leaves(logical_shardings(state, mesh))
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(state), want):
        assert x.sharding.is_equivalent_to(sh, x.ndim), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def setup():
    target = build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=8, initializer_range=0.2), dtype="float32", seed=0)
    draft = build_draft(target, DraftConfig(block_size=4, mask_token_id=MASK_ID, target_layer_ids=(0, 1, 2),
                                            num_anchors=3, num_draft_layers=2, markov_rank=4,
                                            enable_confidence_head=True, dtype="float32"), seed=1)
    opt = make_optimizer(PEAK_LR, TOTAL)
    return target, draft, opt


def stepper(setup, mesh):
    target, draft, opt = setup
    fn = make_train_step(target, draft, opt, mesh=mesh, lr_schedule=dspark_lr_schedule(PEAK_LR, TOTAL),
                         compiler_options=FAST_COMPILE)
    target_state = shard_target_state(nnx.split(target)[1], mesh)
    return lambda state, i: fn(state, target_state, make_batch(i))[0]


def test_resume_is_exact_on_same_and_other_mesh(setup, tmp_path):
    _, draft, opt = setup
    mesh_a, mesh_b = make_mesh(MESH_A), make_mesh(MESH_B)
    step_a, step_b = stepper(setup, mesh_a), stepper(setup, mesh_b)
    ckdir = tmp_path / "ckpt"

    state = shard_train_state(init_train_state(draft, opt, seed=3), mesh_a)
    for i in range(3):
        state = step_a(state, i)
    with TrainCheckpointManager(ckdir, save_every=3, max_to_keep=2) as ckpt:
        assert ckpt.save(state, {"next_batch": 3, "epoch": 0})  # async; the next step donates `state`
        saved = host(state)
        live_b = jax.device_put(jax.tree.map(jnp.copy, state), logical_shardings(state, mesh_b))
        for i in range(3, 6):
            state = step_a(state, i)
        straight = host(state)
    assert int(straight.step) == 6

    with TrainCheckpointManager(ckdir, save_every=3) as ckpt:
        assert ckpt.latest_step() == 3
        # same mesh: resume and continue == 6 straight steps, bit for bit
        resumed, extra = ckpt.restore(sharded_abstract_state(draft, opt, mesh_a))
        assert extra == {"next_batch": 3, "epoch": 0}
        assert_bitwise(resumed, saved, "restored (same mesh)")
        assert_placed(resumed, mesh_a)
        for i in range(extra["next_batch"], 6):
            resumed = step_a(resumed, i)
        assert_bitwise(resumed, straight, "resumed 3 + 3 steps vs 6 straight (same mesh)")

        # another mesh shape: the restore lands on mesh B's shardings with the exact saved values, and continuing
        # there is bit-identical to resharding the live state; it matches mesh A's run to float tolerance
        resumed_b, extra = ckpt.restore(sharded_abstract_state(draft, opt, mesh_b))
        assert_bitwise(resumed_b, saved, "restored (mesh B)")
        assert_placed(resumed_b, mesh_b)
        for i in range(extra["next_batch"], 6):
            resumed_b = step_b(resumed_b, i)
            live_b = step_b(live_b, i)
        assert_bitwise(resumed_b, live_b, "resumed on mesh B vs live reshard to mesh B")
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(straight.params),
                                jax.tree.leaves(host(resumed_b.params))):
            np.testing.assert_allclose(y, x, atol=2e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_incomplete_checkpoints_are_ignored(setup, tmp_path):
    _, draft, opt = setup
    mesh = make_mesh({}, devices=jax.devices()[:1])
    step = stepper(setup, mesh)
    ckdir = tmp_path / "ckpt"
    state = shard_train_state(init_train_state(draft, opt, seed=0), mesh)
    with TrainCheckpointManager(ckdir, save_every=1, max_to_keep=2) as ckpt:
        for i in range(3):
            state = step(state, i)
            assert ckpt.save(state, {"step": i + 1})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]  # max_to_keep
        good = host(state)

    # a crash while writing step 4 (plain directory, no completion marker) and an orbax temporary directory
    os.makedirs(ckdir / "4" / "state" / "d")
    (ckdir / "4" / "state" / "d" / "partial").write_bytes(b"\0" * 100)
    os.makedirs(ckdir / "5.orbax-checkpoint-tmp-1234567" / "state")
    abstract = sharded_abstract_state(draft, opt, mesh)
    with TrainCheckpointManager(ckdir, save_every=1, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        assert len(ckpt.quarantined) == 1 and os.path.basename(ckpt.quarantined[0]).startswith("4.incomplete-")
        restored, extra = ckpt.restore(abstract)
        assert extra == {"step": 3}
        assert_bitwise(restored, good, "restored latest good step")
        # the junk no longer blocks saving step 4
        restored = step(restored, 3)
        assert ckpt.save(restored, {"step": 4})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]

    # a damaged latest checkpoint (its tree metadata lost): restore() falls back to the previous one
    os.remove(ckdir / "4" / "state" / "_METADATA")
    with TrainCheckpointManager(ckdir, save_every=1) as ckpt:
        restored, extra = ckpt.restore(abstract)
        assert extra == {"step": 3}
        assert_bitwise(restored, good, "fallback to step 3")
        with pytest.raises(ValueError):
            ckpt.restore(abstract, step=4)  # an explicit step does not fall back


def test_save_every(setup, tmp_path):
    _, draft, opt = setup
    state = init_train_state(draft, opt)
    with TrainCheckpointManager(tmp_path / "c", save_every=2, max_to_keep=None, async_save=False) as ckpt:
        assert ckpt.save(state, step=0)
        assert not ckpt.save(state, step=1)
        assert ckpt.save(state, step=2)
        assert not ckpt.save(state, step=3)
        assert ckpt.save(state, step=3, force=True)
        assert ckpt.all_steps() == [0, 2, 3]
