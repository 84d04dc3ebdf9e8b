"""The Eagle3 loss through the fused vocab-loss kernels (kernels/vocab_loss.py, soft targets): every driver in
interpret mode against the dense reference on odd shapes, the dispatch, ``eagle3_loss(impl="pallas")`` against
``impl="xla"`` on a tiny draft (full and pruned draft vocabulary), with a softcap, and under a batch-sharded jit."""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dspark_jax as dj
from dspark_jax.config import TargetConfig
from dspark_jax.drafts.config import EAGLE3_LLAMA
from dspark_jax.drafts.eagle3 import Eagle3TrainOutput
from dspark_jax.kernels.vocab_loss_chunked import soft_ce_chunked
from dspark_jax.train.eagle3_loss import eagle3_loss

vl = importlib.import_module("dspark_jax.kernels.vocab_loss")
vl_common = importlib.import_module("dspark_jax.kernels.vocab_loss_common")   # the default tiles live here

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
TILES = {"tpu-interpret": (8, 16), "gpu-interpret": (16, 16), "xla": (None, 16)}
V, H, NH, NKV, HD, I = 37, 16, 2, 1, 8, 32
TAPS = (0, 1, 2)
KEEP = (1, 3, 4, 7, 9, 12, 17, 20, 25, 30, 36)     # a pruned draft vocabulary (as SpecForge's d2t would give)
B, S = 2, 9
CAP = 2.0


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.fixture
def small_tiles(monkeypatch):
    """eagle3_loss takes the default tiles: shrink them so V = 37 has a partial vocab tile and rows a partial
    row tile."""
    monkeypatch.setattr(vl_common, "TPU_TILES", (16, 16))
    monkeypatch.setattr(vl_common, "GPU_TILES", (16, 16, 16))


# ---- the kernels with soft targets, against the dense reference ---------------------------------------------------
def soft_inputs(lead=(3, 2, 7), hidden=40, vocab=77, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    hd = jax.random.normal(k[0], lead + (hidden,))
    ht = jax.random.normal(k[1], lead + (hidden,))
    # a zero target row is Eagle3's past-the-end target (uniform); a zero draft row ties every logit, so the
    # argmax must be the first column (jnp.argmax's rule) across vocab tiles
    ht = ht.at[0, 1, 3:].set(0.0).at[2, 0, 6].set(0.0)
    hd = hd.at[1, 1, 2].set(0.0).at[2, 0, 6].set(0.0)
    w = jax.random.normal(k[2], (vocab, hidden)) * 0.3
    wce = jax.random.uniform(k[3], lead) * (jax.random.uniform(k[4], lead) > 0.3)
    return hd.astype(dtype), ht.astype(dtype), w.astype(dtype), wce, 0.7 * jax.random.uniform(k[5], lead)


def soft_run(fn, hd, ht, w, wce, wl1, argnums=(0, 1, 2)):
    def loss(hd, ht, w):
        ce, l1, match = fn(hd, ht, w)
        return jnp.sum(wce * ce) + jnp.sum(wl1 * l1), (ce, l1, match)

    f = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True), compiler_options=FAST_COMPILE)
    return f(hd, ht, w)


def fused(backend, softcap=None):
    tr, tv = TILES[backend]
    return functools.partial(vl.soft_vocab_loss_fused, backend=backend, row_tile=tr, vocab_tile=tv, softcap=softcap)


@pytest.mark.parametrize("backend,softcap", [("tpu-interpret", None), ("gpu-interpret", None), ("xla", None),
                                             ("tpu-interpret", CAP), ("gpu-interpret", CAP)])
def test_soft_fused_matches_reference(backend, softcap):
    hd, ht, w, wce, wl1 = soft_inputs()
    (val, (ce, l1, match)), grads = soft_run(fused(backend, softcap), hd, ht, w, wce, wl1)
    (rval, (rce, rl1, rmatch)), rgrads = soft_run(
        functools.partial(vl.soft_vocab_loss_reference, softcap=softcap), hd, ht, w, wce, wl1)
    assert abs(float(val - rval)) <= 1e-4
    assert max_err(ce, rce) <= 2e-5 and max_err(l1, rl1) <= 2e-5
    assert match.dtype == jnp.bool_ and np.array_equal(np.asarray(match), np.asarray(rmatch))
    assert bool(match[2, 0, 6]) and bool(match[1, 1, 2]) == bool(rmatch[1, 1, 2])   # ties: first column
    for g, r in zip(grads, rgrads):                                  # draft, target and lm_head gradients
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
        assert max_err(g, r) <= 2e-5
    dead = np.asarray(wce == 0) & np.asarray(wl1 == 0)
    assert np.all(np.asarray(grads[0])[dead] == 0.0)


def test_soft_fused_bf16_matches_reference():
    hd, ht, w, wce, wl1 = soft_inputs(lead=(2, 1, 9), hidden=48, vocab=101, dtype=jnp.bfloat16, seed=1)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    (_, (ce, l1, _)), (g,) = soft_run(fused("tpu-interpret"), hd, ht, w, wce, wl1, argnums=(0,))
    (_, (rce, rl1, _)), (rg,) = soft_run(vl.soft_vocab_loss_reference, f32(hd), f32(ht), f32(w), wce, wl1,
                                         argnums=(0,))
    assert max_err(ce, rce) <= 2e-2 and max_err(l1, rl1) <= 2e-2
    assert g.dtype == jnp.bfloat16 and max_err(g, rg) <= 2e-2


def test_soft_dispatch(monkeypatch):
    hd, ht, w, wce, wl1 = soft_inputs(seed=2)
    monkeypatch.delenv("DSPARK_KERNEL_IMPL", raising=False)
    xla = vl.soft_vocab_loss(hd, ht, w, chunk=16, impl="xla")
    scan = soft_ce_chunked(hd, ht, w, 16)
    assert all(np.array_equal(a, b) for a, b in zip(xla, scan))      # xla = the scan in train/eagle3_loss.py
    assert all(np.array_equal(a, b) for a, b in zip(vl.soft_vocab_loss(hd, ht, w, chunk=16), scan))  # CPU auto
    monkeypatch.setenv("DSPARK_KERNEL_IMPL", "pallas")
    assert str(jax.make_jaxpr(lambda *a: vl.soft_vocab_loss(*a, chunk=16))(hd, ht, w)).count("pallas_call") == 2
    # the target is a constant on both paths (the scan always stop-gradients it)
    for impl in ("xla", "pallas"):
        (_, _), (g_ht,) = soft_run(functools.partial(vl.soft_vocab_loss, chunk=16, impl=impl, row_tile=8,
                                                     vocab_tile=16), hd, ht, w, wce, wl1, argnums=(1,))
        assert not np.any(np.asarray(g_ht))


# ---- eagle3_loss: impl="pallas" == impl="xla" -----------------------------------------------------------------
@pytest.fixture(scope="module")
def target():
    return dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                        num_hidden_layers=4, num_attention_heads=NH, num_key_value_heads=NKV,
                                        head_dim=HD, initializer_range=0.5), dtype="float32")


@pytest.fixture(scope="module")
def batch(target):
    ids = jax.random.randint(jax.random.key(3), (B, S), 0, V, dtype=jnp.int32)
    out = target(ids, tap_layer_ids=TAPS)
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1, 1, 1]], jnp.int32)
    attn = jnp.array([[1] * S, [1] * 7 + [0] * 2], jnp.int32)
    return ids, loss_mask, out.taps, out.last_hidden, attn


def llama_draft(target, pruned):
    cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", eagle3_variant=EAGLE3_LLAMA, target_layer_ids=TAPS,
                         num_draft_layers=1, ttt_length=3, markov_rank=0, enable_confidence_head=False,
                         dtype="float32", draft_vocab=KEEP if pruned else None)
    draft = dj.build_draft(target, cfg, seed=7)
    if pruned:   # as a loaded SpecForge checkpoint: the [Vd, H] head scattered into [V, H], zeros elsewhere
        keep = jnp.zeros((V, 1), bool).at[jnp.asarray(KEEP)].set(True)
        draft.lm_head[...] = jnp.where(keep, draft.lm_head[...], 0.0)
    return draft


@pytest.mark.parametrize("pruned", [False, True])
def test_eagle3_loss_pallas_equals_xla(target, batch, pruned, small_tiles):
    """Loss, every metric and every parameter gradient of a tiny Eagle3 draft's TTT loss."""
    draft = llama_draft(target, pruned)
    graphdef, params, rest = nnx.split(draft, nnx.Param, ...)
    ids, loss_mask, taps, last, attn = batch

    def loss(params, impl):
        model = nnx.merge(graphdef, params, rest)
        out = model.train_forward(ids, loss_mask, taps, last, attn, materialize_logits=False)
        return eagle3_loss(out, model.config, vocab_chunk=16, impl=impl)

    res = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), has_aux=True),
                         compiler_options=FAST_COMPILE)(params) for impl in ("xla", "pallas")}
    (lx, mx), gx = res["xla"]
    (lp, mp), gp = res["pallas"]
    assert abs(float(lx - lp)) <= 1e-5
    for k in mx:
        assert abs(float(mx[k] - mp[k])) <= 1e-5, k
    leaves_x, leaves_p = jax.tree.leaves(gx), jax.tree.leaves(gp)
    assert leaves_x and len(leaves_x) == len(leaves_p)
    assert max(max_err(a, b) for a, b in zip(leaves_x, leaves_p)) <= 2e-5
    # and the materialised-logits reference agrees with both
    model = nnx.merge(graphdef, params, rest)
    ref, _ = eagle3_loss(model.train_forward(ids, loss_mask, taps, last, attn), model.config)
    assert abs(float(ref - lp)) <= 1e-5


def synthetic_outputs(softcap=None, lead=(3, 4, 5), hidden=24, vocab=41, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    t, b, s = lead
    th = jax.random.normal(k[1], lead + (hidden,)).at[:, :, s - 1].set(0.0)     # past the end: uniform
    mask = (jax.random.uniform(k[2], lead) > 0.3).astype(jnp.float32)
    return Eagle3TrainOutput(draft_logits=None, target_logits=None, position_mask=mask,
                             draft_hidden=jax.random.normal(k[0], lead + (hidden,)), target_hidden=th,
                             lm_head=jax.random.normal(k[3], (vocab, hidden)) * 0.4, softcap=softcap)


def loss_and_grads(out, impl):
    """Loss, metrics and the gradients w.r.t. the draft hidden state, target hidden state and lm_head."""
    cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4), ttt_length=3)

    def f(hd, ht, w):
        o = Eagle3TrainOutput(None, None, out.position_mask, hd, ht, w, softcap=out.softcap)
        return eagle3_loss(o, cfg, vocab_chunk=16, impl=impl)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True), compiler_options=FAST_COMPILE)(
        out.draft_hidden, out.target_hidden, out.lm_head)


@pytest.mark.parametrize("softcap", [None, CAP])
def test_eagle3_loss_softcap_and_uniform_targets(softcap, small_tiles):
    out = synthetic_outputs(softcap)
    (lx, mx), gx = loss_and_grads(out, "xla")
    (lp, mp), gp = loss_and_grads(out, "pallas")
    assert abs(float(lx - lp)) <= 1e-5
    assert all(abs(float(mx[k] - mp[k])) <= 1e-5 for k in mx)
    for a, b in zip(gx, gp):
        assert max_err(a, b) <= 2e-5
    assert not np.any(np.asarray(gp[1]))            # target hidden: stop_gradient on both paths
    assert np.any(np.asarray(gp[2]))                # lm_head (frozen in a draft, but differentiable here)


def test_eagle3_loss_sharded_batch(small_tiles):
    """[T,B,S,H] outputs sharded over the batch (dim 1), as the trainer's batch sharding leaves them: the Pallas
    path runs per shard (no activation gather) and equals the unsharded XLA path."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    from dspark_jax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    out = synthetic_outputs(seed=4)
    rows = lambda nd: NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (nd - 2))))  # noqa: E731
    sharded = Eagle3TrainOutput(None, None, jax.device_put(out.position_mask, rows(3)),
                                jax.device_put(out.draft_hidden, rows(4)), jax.device_put(out.target_hidden, rows(4)),
                                jax.device_put(out.lm_head, NamedSharding(mesh, P())))
    cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4), ttt_length=3)

    def f(hd, ht, w, mask):
        return eagle3_loss(Eagle3TrainOutput(None, None, mask, hd, ht, w), cfg, vocab_chunk=16, impl="pallas")

    step = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)
    args = (sharded.draft_hidden, sharded.target_hidden, sharded.lm_head, sharded.position_mask)
    (lp, mp), gp = step(*args)
    (lx, mx), gx = loss_and_grads(out, "xla")
    assert abs(float(lx - lp)) <= 1e-5 and all(abs(float(mx[k] - mp[k])) <= 1e-5 for k in mx)
    assert max_err(gp, gx[0]) <= 2e-5
    assert tuple(gp.sharding.spec)[:2] == (None, ("data", "fsdp"))
    hlo = step.lower(*args).compile().as_text()
    assert not re.search(r"\s(all-gather|all-gather-start|all-to-all)\(", hlo)
