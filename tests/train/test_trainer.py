"""The training loop (dspark_jax/train/trainer.py), its configs (train/config.py) and CLI (dspark train).

One module fixture runs the whole "tiny" recipe on a small dataset: a Qwen3-shaped target trained from scratch
on 16 embedded conversations, then a DSpark draft trained against it (the overfitting test, timed). The other
tests reuse that pre-trained target from its HF directory:
  - exact resume after a real SIGKILL of a ``dspark train`` subprocess (parameters and loss curve identical);
  - resume onto a different mesh shape (1 device -> data=2 x fsdp=2 x tensor=2);
  - exact resume of a packed run (data.packing);
  - training from the offline cache == training online (same batch, same loss);
  - DFlash and Eagle3 through the same loop; TensorBoard events; the dry-run memory table; bad input.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
import yaml

from dspark_jax.config import ConfigError
from dspark_jax.train.checkpoint import is_complete_step_dir
from dspark_jax.train.config import KNOWN_TARGETS, list_presets, load_train_config, target_config_for
from dspark_jax.train.trainer import EMBEDDED, Trainer

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
TINY_TARGET = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
               "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 384}
NUM_CONVERSATIONS = 16
OVERFIT_EPOCHS = 80


def base_overrides(out_dir, data_file, **extra) -> list[str]:
    items = {
        "output_dir": str(out_dir), "data.train_files": f"[{data_file}]", "data.buckets": "[128]",
        "data.max_length": 128, "data.num_threads": 0, "log.progress": "false", "log.every": 1,
        "checkpoint.every": 1, "checkpoint.keep": 3, "optim.global_batch_size": 8, "optim.epochs": 10,
        "draft.num_anchors": 8, "draft.markov_rank": 16, "draft.target_layer_ids": "[0,1]",
        "mesh.fsdp": 1,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def with_target(target_dir, out_dir, data_file, **extra) -> list[str]:
    return base_overrides(out_dir, data_file, **{"target.path": str(target_dir), "target.dtype": "float32",
                                                 "target.pretrain_steps": 0,
                                                 **extra})


def one_device():
    return jax.devices()[:1]


def draft_params(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(EMBEDDED["embedded:tiny"]) as f:
        lines = [next(f) for _ in range(NUM_CONVERSATIONS)]
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, data_file):
    """The tiny recipe end to end: pre-train a random target, then train a DSpark draft against it."""
    out = tmp_path_factory.mktemp("overfit")
    cfg = load_train_config("tiny", base_overrides(
        out, data_file, **{"target.tiny": json.dumps(TINY_TARGET), "target.pretrain_steps": 80,
                           "target.pretrain_lr": 1e-2, "target.pretrain_batch_size": 16, "optim.lr": 1e-2,
                           "optim.epochs": OVERFIT_EPOCHS, "checkpoint.every": 1000}))
    t0 = time.perf_counter()
    result = Trainer(cfg, devices=one_device()).run()
    return result, time.perf_counter() - t0, out


def test_overfit_small_dataset(overfit):
    result, seconds, out = overfit
    hist = result.history
    assert result.steps == OVERFIT_EPOCHS * (NUM_CONVERSATIONS // 8) == len(hist)
    first, last = hist[0], np.mean([h["loss"] for h in hist[-3:]])
    print(f"overfit: {seconds:.1f}s, loss {first['loss']:.3f} -> {last:.3f}, accept_rate@0 "
          f"{first['accept_rate@0']:.3f} -> {hist[-1]['accept_rate@0']:.3f}")
    assert last <= 0.2 * first["loss"], (first["loss"], last)
    assert hist[-1]["accept_rate@0"] > first["accept_rate@0"] + 0.3
    assert hist[-1]["tau_probabilistic"] > first["tau_probabilistic"]
    assert seconds < 60, f"the overfitting recipe took {seconds:.1f}s (budget 60s)"
    # what the run leaves behind: resolved config, metrics, exported draft, target + tokenizer
    assert yaml.safe_load((out / "config.yaml").read_text())["draft"]["kind"] == "dspark"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, result.steps + 1))
    assert {"loss", "ce", "l1", "bce", "accept_rate@0", "tau_probabilistic", "lr", "grad_norm"} <= set(lines[0])
    assert "tokens_per_s" in lines[-1]
    assert os.path.isfile(out / "draft" / "config.json") and os.path.isfile(out / "target" / "tokenizer.json")
    import dspark_jax as dj

    draft = dj.load_draft(out / "draft", dtype="float32")
    nnx = __import__("flax").nnx
    for got, want in zip(jax.tree.leaves(jax.device_get(nnx.state(draft, nnx.Param))), draft_params(result.state)):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.fixture(scope="module")
def target_dir(overfit):
    return overfit[2] / "target"


_CHILD_CACHE = tempfile.mkdtemp(prefix="dspark_cli_jax_cache_")
atexit.register(shutil.rmtree, _CHILD_CACHE, True)


def _cli_env():
    # one fake device in every child, so the killed, resumed and straight runs compile the same programs; every
    # program is cached (not only those over 1 s): the resumed and straight runs reuse the killed run's compilations
    return dict(os.environ,
                XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_llvm_disable_expensive_passes=true",
                JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or _CHILD_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _train_cli(overrides) -> subprocess.Popen:
    # output to a file, not a pipe: nobody reads a pipe while the process runs, and once its 64 KiB fill (XLA:CPU logs
    # ~6 KB per executable it loads from a warm compilation cache) the child blocks on its next write
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "dspark_jax.cli", "train", "--config", "tiny", *overrides],
                            env=_cli_env(), stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


def _finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=300)
    assert proc.returncode == 0, _output(proc)


def test_sigkill_resume_is_exact(target_dir, data_file, tmp_path):
    """A real ``dspark train`` process, SIGKILLed after its 3rd checkpoint, then resumed by a new process for 3
    more steps == a run that was never stopped: bit-identical parameters and loss curve."""
    from flax import nnx

    import dspark_jax as dj
    from dspark_jax.train.checkpoint import TrainCheckpointManager

    run = tmp_path / "killed"
    proc = _train_cli(with_target(target_dir, run, data_file, **{"optim.max_steps": 1000}))
    deadline = time.time() + 240
    ckpt = run / "checkpoints"
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("training process exited before it could be killed:\n" + _output(proc))
            if (ckpt / "3").is_dir() and is_complete_step_dir(ckpt / "3"):
                break
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint 3 within 240s; the process's output so far:\n" + _output(proc)[-4000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "draft").exists()  # it really died mid-run
    with TrainCheckpointManager(ckpt) as m:
        killed_at = m.latest_step()
    assert killed_at >= 3
    total = killed_at + 3
    _finish(_train_cli(with_target(target_dir, run, data_file, **{"optim.max_steps": total})))
    _finish(_train_cli(with_target(target_dir, tmp_path / "straight", data_file, **{"optim.max_steps": total})))

    def params(d):
        return jax.tree.leaves(jax.device_get(nnx.state(dj.load_draft(d / "draft", dtype="float32"), nnx.Param)))

    for a, b in zip(params(run), params(tmp_path / "straight")):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def curve(d):
        return [(x["step"], x["loss"]) for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert [s for s, _ in curve(run)] == list(range(1, total + 1))
    assert curve(run) == curve(tmp_path / "straight")


def test_resume_onto_another_mesh(target_dir, data_file, tmp_path):
    """3 steps on one device, then 3 more on data=2 x fsdp=2 x tensor=2 == 6 steps on one device (1e-5)."""
    def cfg(out, steps, **mesh):
        extra = {"optim.max_steps": steps, "optim.precision": "fp32", **{f"mesh.{k}": v for k, v in mesh.items()}}
        return load_train_config("tiny", with_target(target_dir, out, data_file, **extra))

    Trainer(cfg(tmp_path / "moved", 3), devices=one_device(), compiler_options=FAST_COMPILE).run()
    moved = Trainer(cfg(tmp_path / "moved", 6, data=2, fsdp=2, tensor=2), compiler_options=FAST_COMPILE).run()
    straight = Trainer(cfg(tmp_path / "straight", 6), devices=one_device(), compiler_options=FAST_COMPILE).run()
    assert moved.steps == 6
    assert {d.id for d in jax.tree.leaves(moved.state.params)[0].sharding.device_set} == {d.id for d in jax.devices()}
    for a, b in zip(draft_params(moved.state), draft_params(straight.state)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    lm = [x["loss"] for x in map(json.loads, (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines())]
    ls = [x["loss"] for x in straight.history]
    np.testing.assert_allclose(lm, ls, rtol=1e-5)


def test_packed_resume_is_exact(target_dir, data_file, tmp_path):
    """data.packing: a run resumed from its step-2 checkpoint == the run that went straight to step 4
    (bit-identical parameters and losses), and its rows really hold several conversations."""
    import shutil

    def run(out):
        cfg = load_train_config("tiny", with_target(target_dir, out, data_file, **{
            "data.packing": "true", "data.max_length": 256, "data.buckets": "[256]", "optim.global_batch_size": 2,
            "optim.max_steps": 4, "optim.precision": "fp32", "checkpoint.export_draft": "false"}))
        return Trainer(cfg, devices=one_device(), compiler_options=FAST_COMPILE)

    straight_trainer = run(tmp_path / "straight")
    rows = straight_trainer.pipeline.batch(0)["segment_ids"]
    assert rows.max() >= 2 and len(straight_trainer.pipeline.samples) < NUM_CONVERSATIONS
    straight = straight_trainer.run()
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for step in ("3", "4"):                  # back to the state after step 2
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    resumed = run(tmp_path / "resumed").run()
    assert resumed.steps == 4 and [h["step"] for h in resumed.history] == [3, 4]
    for a, b in zip(draft_params(resumed.state), draft_params(straight.state)):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]


def test_offline_cache_equals_online(target_dir, data_file, tmp_path):
    """`dspark prepare-cache` then training from the cache gives the online run's losses (same batches).

    fp32 target, cache stored in fp32 (our extension of the layout), so the features are the same numbers."""
    from dspark_jax.cli import main
    from dspark_jax.train import target_cache as tc

    cache = tmp_path / "cache"
    orig = tc.TargetCacheWriter.__init__

    def writer_init(self, *a, **kw):  # prepare-cache writes DeepSpec's bf16; store fp32 here
        orig(self, *a, **{**kw, "hidden_dtype": "float32"})

    tc.TargetCacheWriter.__init__ = writer_init
    try:
        assert main(["prepare-cache", "--config", "tiny", "--out", str(cache),
                     *with_target(target_dir, tmp_path / "prep", data_file, **{"mesh.fsdp": -1})]) == 0
    finally:
        tc.TargetCacheWriter.__init__ = orig
    assert len(tc.TargetCache(cache)) == NUM_CONVERSATIONS
    _assert_same_losses(target_dir, data_file, tmp_path, cache, "float32", FAST_COMPILE)


def test_offline_bf16_cache_equals_online(target_dir, data_file, tmp_path):
    """A bf16 target and DeepSpec's bf16 cache: the same losses once XLA rounds every bf16 op (inside one jitted
    program XLA may keep fused bf16 chains in f32, and the target's fusions differ between the cache writer and
    the train step; with excess precision off both round like eager code)."""
    from dspark_jax.train.target_cache import TargetCache, write_target_cache

    exact = {**FAST_COMPILE, "xla_allow_excess_precision": False}
    cfg = load_train_config("tiny", with_target(target_dir, tmp_path / "prep", data_file,
                                                **{"target.dtype": "bfloat16"}))
    inputs = Trainer(cfg, devices=one_device(), inputs_only=True)
    write_target_cache(tmp_path / "cache", inputs.samples, inputs.target, target_layer_ids=(0, 1), progress=False,
                       compiler_options=exact)
    assert TargetCache(tmp_path / "cache").manifest.hidden_dtype == "bfloat16"
    _assert_same_losses(target_dir, data_file, tmp_path, tmp_path / "cache", "bfloat16", exact)


def _assert_same_losses(target_dir, data_file, tmp_path, cache, target_dtype, compiler_options):
    def run(name, **extra):
        cfg = load_train_config("tiny", with_target(target_dir, tmp_path / name, data_file, **{
            "target.dtype": target_dtype, "optim.max_steps": 2, **extra}))
        return Trainer(cfg, devices=one_device(), compiler_options=compiler_options).run().history

    online, offline = run("online"), run("offline", **{"data.cache_dir": str(cache)})
    assert len(online) == len(offline) == 2
    for a, b in zip(online, offline):
        for k in ("loss", "ce", "l1", "bce", "accept_rate@0"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_cache_for_another_target_is_refused(target_dir, data_file, tmp_path):
    from dspark_jax.train.target_cache import CacheError, TargetCacheWriter

    cache = tmp_path / "cache"
    with TargetCacheWriter(cache, target_layer_ids=(0, 2), hidden_size=TINY_TARGET["hidden_size"]) as w:
        w.add(np.arange(20), np.ones(20, np.uint8), np.zeros((20, 2 * 48)), np.zeros((20, 48)))
    with pytest.raises(CacheError, match="target_layer_ids"):
        Trainer(load_train_config("tiny", with_target(target_dir, tmp_path / "x", data_file,
                                                      **{"data.cache_dir": str(cache)})), devices=one_device())


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_baselines_train_through_the_same_loop(target_dir, data_file, tmp_path, kind):
    # global batch = the whole (16-conversation) set: every step sees the same rows, so the loss must fall
    extra = {"optim.max_steps": 3, "optim.lr": 5e-3, "optim.global_batch_size": 16}
    if kind == "eagle3":
        # the 3-layer tiny target has 2 tappable layers; Eagle3 needs exactly 5 taps: train on a fresh 6-layer one
        over = base_overrides(tmp_path, data_file,
                              **{**extra, "draft.target_layer_ids": "[0,1,2,3,4]",
                                 "target.tiny": json.dumps({**TINY_TARGET, "num_hidden_layers": 6})})
        cfg = load_train_config("tiny-eagle3", over + ["target.pretrain_steps=0", "draft.ttt_length=3"])
    else:
        cfg = load_train_config("tiny-dflash", with_target(target_dir, tmp_path, data_file, **extra))
    result = Trainer(cfg, devices=one_device(), compiler_options=FAST_COMPILE).run()
    assert result.steps == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    import dspark_jax as dj

    assert dj.load_draft(result.draft_dir).config.is_eagle3 == (kind == "eagle3")


def test_tensorboard_events(overfit):
    pytest.importorskip("tensorboardX", reason="optional dependency (dspark_jax[tensorboard])")
    events = [f for f in os.listdir(overfit[2] / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(overfit[2] / "tensorboard" / events[0]) > 100


def test_gradient_accumulation_matches_schedule(target_dir, data_file, tmp_path):
    """micro batch 4 of global 8: two micro-steps per update; the lr advances once per update."""
    cfg = load_train_config("tiny", with_target(target_dir, tmp_path, data_file, **{
        "optim.micro_batch_size": 4, "optim.max_steps": 4}))
    result = Trainer(cfg, devices=one_device(), compiler_options=FAST_COMPILE).run()
    from dspark_jax.train.schedule import dspark_lr_schedule

    updates = [h["update"] for h in result.history]
    assert updates == [0, 1, 1, 2]  # "update" counts finished updates after the step
    schedule = dspark_lr_schedule(cfg.optim.lr, result.history and 10 * 2, cfg.optim.warmup_ratio)
    # metrics["lr"] is the rate of the update the micro-step contributes to: 0, 0, 1, 1
    want = [float(schedule(u)) for u in (0, 0, 1, 1)]
    np.testing.assert_allclose([h["lr"] for h in result.history], want, rtol=1e-6)
    assert want[0] != want[2]


# ---- configs ----------------------------------------------------------------------------------------------
def test_presets_load_and_mirror_deepspec():
    names = list_presets()
    for size in ("4b", "8b", "14b"):
        for kind in ("dspark", "dflash", "eagle3"):
            assert f"qwen3-{size}-{kind}" in names
    c = load_train_config("qwen3-14b-dspark")
    assert c.draft.target_layer_ids == (1, 10, 19, 28, 37) and c.target.arch == "qwen3-14b"
    assert (c.optim.lr, c.optim.warmup_ratio, c.optim.epochs, c.optim.global_batch_size, c.optim.grad_clip,
            c.optim.weight_decay, c.optim.seed) == (6e-4, 0.04, 10, 512, 1.0, 0.0, 42)
    assert (c.draft.block_size, c.draft.num_draft_layers, c.draft.num_anchors, c.draft.markov_rank,
            c.draft.mask_token_id, c.data.max_length) == (7, 5, 512, 256, 151669, 4096)
    d = load_train_config("qwen3-8b-dflash")
    assert d.draft.markov_rank == 0 and not d.draft.enable_confidence_head and d.target.arch == "qwen3-8b"
    e = load_train_config("qwen3-4b-eagle3")
    assert e.draft.kind == "eagle3" and e.draft.num_draft_layers == 1 and e.optim.seed == 0
    assert target_config_for(c.target).num_hidden_layers == KNOWN_TARGETS["qwen3-14b"]["num_hidden_layers"]


@pytest.mark.parametrize("overrides,match", [
    (["optim.lr=fast"], r"optim.lr must be a float, got str 'fast'"),
    (["optim.epochs=2.5"], r"optim.epochs must be an int"),
    (["optim.bogus=1"], r"unknown key\(s\) \['optim.bogus'\]"),
    (["draft.kind=medusa"], r"draft.kind='medusa' is not one of"),
    (["optim.micro_batch_size=3"], r"must divide optim.global_batch_size"),
    (["draft.target_layer_ids=[1,x]"], r"draft.target_layer_ids\[1\] must be an int"),
    (["optim.lr"], r"is not key=value"),
    (["log.every=0"], r"log.every must be >= 1"),
])
def test_bad_config_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config("tiny", overrides)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\noptim:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*optim.lr must be a float, got list"):
        load_train_config(bad)
    bad.write_text("optim: {lr: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)
    with pytest.raises(FileNotFoundError, match="presets:"):
        load_train_config(tmp_path / "missing.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_train_config(loop)


def test_bad_runs(target_dir, data_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        Trainer(load_train_config("tiny", with_target(target_dir, tmp_path, tmp_path / "nowhere.jsonl")),
                devices=one_device())
    with pytest.raises(ConfigError, match=r"mesh .*3"):
        Trainer(load_train_config("tiny", with_target(target_dir, tmp_path, data_file,
                                                      **{"mesh.data": 3, "mesh.fsdp": -1})))
    with pytest.raises(ConfigError, match="only useful for --dry-run"):
        Trainer(load_train_config("qwen3-4b-dspark", [f"data.train_files=[{data_file}]"]), devices=one_device())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data_file).readline() + "{not json\n")
    from dspark_jax.train.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        Trainer(load_train_config("tiny", with_target(target_dir, tmp_path, bad)), devices=one_device())


def test_dry_run_memory_table(capsys):
    from dspark_jax.cli import main
    from dspark_jax.train.memory import estimate_memory

    cfg = load_train_config("qwen3-4b-dspark", ["optim.micro_batch_size=64"])
    full = estimate_memory(cfg, 64)
    # exact parameter counts of Qwen3-4B (4.02B) and the DSpark draft (5 layers + fc + Markov W1/W2)
    assert full.counts["target"] == 4_022_468_096
    t = target_config_for(cfg.target)
    layer = (2 * t.hidden_size * t.num_attention_heads * t.head_dim + 2 * t.hidden_size * t.num_key_value_heads
             * t.head_dim + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size + 2 * t.head_dim)
    expected = (5 * layer + 5 * t.hidden_size ** 2 + 2 * t.hidden_size + 2 * t.vocab_size * 256
                + 2 * t.hidden_size + 256 + 1)
    assert abs(full.counts["draft trainable"] - expected) < 0.01 * expected
    # placement arithmetic: 64-way fsdp vs 8-way data x 8-way fsdp (params are 8x larger per device)
    dp = estimate_memory(cfg.with_overrides(["mesh.data=8", "mesh.fsdp=8"]), 64)
    ratio = dp.rows["target parameters"] / full.rows["target parameters"]
    assert 6 < ratio <= 8
    assert main(["train", "--config", "qwen3-4b-dspark", "--dry-run", "--num-devices", "64", "--device", "v5e",
                 "optim.micro_batch_size=64", "mesh.tensor=4"]) == 0
    out = capsys.readouterr().out
    assert "per-device memory on 64 device(s), mesh (fsdp=16, tensor=4)" in out and "v5e has 16 GiB" in out
    with pytest.raises(ConfigError, match="does not divide"):
        estimate_memory(cfg.with_overrides(["mesh.tensor=3"]), 64)


def test_replicated_draft_on_sharded_target(target_dir, data_file, tmp_path):
    """mesh.draft_sharding=replicated: the draft's state is not split over fsdp (DeepSpec's NO_SHARD), the target
    still is, and the step computes the same loss as the fully sharded layout."""
    def run(name, how):
        cfg = load_train_config("tiny", with_target(target_dir, tmp_path / name, data_file, **{
            "optim.max_steps": 2, "optim.precision": "fp32", "mesh.fsdp": 4, "mesh.tensor": 2,
            "mesh.draft_sharding": how}))
        trainer = Trainer(cfg, compiler_options=FAST_COMPILE)
        return trainer, trainer.run()

    rep_trainer, rep = run("rep", "replicated")
    _, shard = run("shard", "sharded")
    specs = [x.sharding.spec for x in jax.tree.leaves(rep.state.params)]
    assert all("fsdp" not in str(s) for s in specs) and any("tensor" in str(s) for s in specs)
    target_specs = [x.sharding.spec for x in jax.tree.leaves(rep_trainer.target_state)]
    assert any("fsdp" in str(s) for s in target_specs)
    np.testing.assert_allclose([h["loss"] for h in rep.history], [h["loss"] for h in shard.history], rtol=1e-5)
