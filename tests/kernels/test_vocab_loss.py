"""Fused vocab reduction of the DSpark loss (kernels/vocab_loss.py): every Pallas driver in interpret mode against
the dense reference, forward and gradients, on odd shapes; the dispatch; lowering for real TPU / GPU targets."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.kernels.vocab_loss_chunked import slot_ce_l1_chunked
from dspark_jax.kernels.vocab_loss_dense import vocab_loss_dense

vl = importlib.import_module("dspark_jax.kernels.vocab_loss")  # the module: the package exports a function so named

BACKENDS = ("tpu-interpret", "gpu-interpret", "xla")     # "xla": the same algorithm as plain XLA ops
ARGS = ("hd", "ht", "u", "w", "w2")
# small tiles so every shape below has partial row and vocab tiles (Triton needs powers of two >= 16)
TILES = {"tpu-interpret": (8, 16), "gpu-interpret": (16, 16), "xla": (None, 16)}
# interpret-mode kernels are cheap to run and slow to compile: compile them with XLA's fast settings
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def make_inputs(lead=(2, 3, 5), hidden=40, vocab=77, rank=24, dtype=jnp.float32, markov=True, seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    x = {
        "hd": jax.random.normal(k[0], lead + (hidden,)),
        "ht": jax.random.normal(k[1], lead + (hidden,)),
        "u": jax.random.normal(k[2], lead + (rank,)) * 0.5 if markov else None,
        "w": jax.random.normal(k[3], (vocab, hidden)) * 0.3,
        "w2": jax.random.normal(k[4], (vocab, rank)) * 0.3 if markov else None,
    }
    x = {n: None if v is None else v.astype(dtype) for n, v in x.items()}
    ids = jax.random.randint(k[5], lead, 0, vocab)
    # per-row loss weights, like eval_mask * exp(-k/gamma); some rows masked out entirely
    wce = jax.random.uniform(k[6], lead) * (jax.random.uniform(k[7], lead) > 0.3)
    wl1 = 0.9 * wce
    return x, ids, wce, wl1


def weighted(fn, ids, wce, wl1):
    def loss(hd, ht, u, w, w2):
        ce, l1 = fn(hd, ht, u, w, w2, ids)
        return jnp.sum(wce * ce) + jnp.sum(wl1 * l1), (ce, l1)
    return loss


def run(fn, x, ids, wce, wl1, argnums):
    f = jax.jit(jax.value_and_grad(weighted(fn, ids, wce, wl1), argnums=argnums, has_aux=True),
                compiler_options=FAST_COMPILE)
    (val, (ce, l1)), grads = f(*(x[n] for n in ARGS))
    return val, ce, l1, grads


def pallas_fn(backend):
    if backend == "dense":     # the one-pass XLA path with a hand-written backward (kernels/vocab_loss_dense.py)
        return vocab_loss_dense
    tr, tv = TILES[backend]
    return functools.partial(vl.vocab_loss_fused, backend=backend, row_tile=tr, vocab_tile=tv)


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def assert_close(got, ref, tol, grad_dtype=None):
    """``run`` results: CE, L1 and every gradient of ``got`` within ``tol`` of ``ref`` (the gradients of dtype
    ``grad_dtype`` when given)."""
    assert max_err(got[1], ref[1]) <= tol and max_err(got[2], ref[2]) <= tol
    for g, r in zip(got[3], ref[3]):
        if grad_dtype is not None:
            assert g.dtype == grad_dtype
        assert max_err(g, r) <= tol


def assert_bf16_close(ref_fn, fn):
    """``fn`` on bf16 inputs (odd sizes) against ``ref_fn`` on the same values in fp32: CE, L1 and the gradients
    training takes (hidden, u, W2), which stay bf16, within 2e-2."""
    x, ids, wce, wl1 = make_inputs(lead=(1, 4, 7), hidden=48, vocab=101, rank=16, dtype=jnp.bfloat16, seed=1)
    x32 = {n: v.astype(jnp.float32) for n, v in x.items()}          # the same bf16 values, exactly
    argnums = (0, 2, 4)                                              # what training differentiates
    ref = run(ref_fn, x32, ids, wce, wl1, argnums)
    got = run(fn, x, ids, wce, wl1, argnums)
    assert_close(got, ref, 2e-2, grad_dtype=jnp.bfloat16)


@pytest.mark.parametrize("backend,markov", [("tpu-interpret", True), ("gpu-interpret", True), ("tpu-interpret", False),
                                            ("xla", True), ("xla", False), ("dense", True), ("dense", False)])
def test_fp32_matches_reference_forward_and_grads(backend, markov):
    x, ids, wce, wl1 = make_inputs(markov=markov)
    argnums = (0, 1, 2, 3, 4) if markov else (0, 1, 3)
    ref = run(vl.vocab_loss_reference, x, ids, wce, wl1, argnums)
    got = run(pallas_fn(backend), x, ids, wce, wl1, argnums)
    assert_close(got, ref, 2e-5, grad_dtype=jnp.float32)
    # rows with zero weight get exactly zero gradient (no NaN from padding or masked vocab columns)
    dead = np.asarray((wce == 0) & (wl1 == 0))
    assert np.all(np.asarray(got[3][0])[dead] == 0.0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got[3])


@pytest.mark.parametrize("backend", BACKENDS + ("dense",))
def test_bf16_matches_reference(backend):
    assert_bf16_close(vl.vocab_loss_reference, pallas_fn(backend))


def test_only_differentiated_inputs_get_kernels():
    """lm_head frozen and target hidden stop_gradient (training): no [V, H] weight-gradient kernel is built."""
    x, ids, wce, wl1 = make_inputs()
    loss = weighted(pallas_fn("tpu-interpret"), ids, wce, wl1)

    def n_kernels(argnums):
        jaxpr = jax.make_jaxpr(jax.grad(lambda *a: loss(*a)[0], argnums=argnums))(*(x[n] for n in ARGS))
        return str(jaxpr).count("pallas_call")

    assert n_kernels((0,)) == 3             # lse, l1, dX
    assert n_kernels((0, 2, 4)) == 4        # + dW (for W2 only)
    assert n_kernels((0, 1, 2, 3, 4)) == 4  # dX and dW kernels grow outputs, not calls


def test_single_row_and_vocab_smaller_than_tile():
    x, ids, wce, wl1 = make_inputs(lead=(1,), hidden=16, vocab=5, rank=8)
    ref = run(vl.vocab_loss_reference, x, ids, wce + 1.0, wl1 + 1.0, (0,))
    for backend in BACKENDS:                                         # default tiles, clipped to the problem
        got = run(functools.partial(vl.vocab_loss_fused, backend=backend), x, ids, wce + 1.0, wl1 + 1.0, (0,))
        assert max_err(got[1], ref[1]) <= 2e-5 and max_err(got[2], ref[2]) <= 2e-5
        assert all(max_err(g, r) <= 2e-5 for g, r in zip(got[3], ref[3]))


def test_dispatch(monkeypatch):
    x, ids, _, _ = make_inputs()
    args = [x[n] for n in ARGS] + [ids]
    monkeypatch.delenv("DSPARK_KERNEL_IMPL", raising=False)
    xla = vl.vocab_loss(*args, chunk=16, impl="xla")
    chunked = slot_ce_l1_chunked(*args, 16)
    assert all(np.array_equal(a, b) for a, b in zip(xla, chunked))       # xla = the scan in train/loss.py
    auto = vl.vocab_loss(*args, chunk=16)                                # CPU: auto = xla
    assert all(np.array_equal(a, b) for a, b in zip(auto, chunked))
    pallas = jax.jit(functools.partial(vl.vocab_loss, impl="pallas", row_tile=8, vocab_tile=16),
                     compiler_options=FAST_COMPILE)(*args)
    assert max(max_err(a, b) for a, b in zip(pallas, chunked)) <= 1e-5
    monkeypatch.setenv("DSPARK_KERNEL_IMPL", "pallas")
    n = str(jax.make_jaxpr(lambda *a: vl.vocab_loss(*a, chunk=16))(*args)).count("pallas_call")
    assert n == 2
    whole = vl.vocab_loss(*args, chunk=x["w"].shape[0], impl="xla")     # one chunk = the vocab: one pass
    assert all(np.array_equal(a, b) for a, b in zip(whole, vocab_loss_dense(*args)))
    assert max(max_err(a, b) for a, b in zip(whole, chunked)) <= 1e-5
    with pytest.raises(ValueError):
        vl.vocab_loss(*args, impl="cuda")
    with pytest.raises(ValueError):
        vl.vocab_loss(x["hd"], x["ht"], x["u"], x["w"], None, ids)


def test_dspark_loss_pallas_equals_xla():
    """The loss and its gradients through dspark_loss (vocab_chunk set) agree between impl=xla and impl=pallas."""
    from dspark_jax.drafts.config import DraftConfig
    from dspark_jax.drafts.dspark import DraftTrainOutput
    from dspark_jax.train.loss import dspark_loss

    b, n, bs, h, v, r = 1, 3, 7, 32, 90, 16
    x, ids, _, _ = make_inputs(lead=(b, n, bs), hidden=h, vocab=v, rank=r, seed=3)
    mask = jnp.cumprod(jax.random.uniform(jax.random.key(4), (b, n, bs)) > 0.2, axis=-1).astype(jnp.float32)
    conf = jax.random.normal(jax.random.key(5), (b, n, bs))
    cfg = DraftConfig(block_size=bs, markov_rank=r)

    def loss(hd, u, w2, conf, impl):
        out = DraftTrainOutput(None, None, conf, ids, mask, hd, x["ht"], u, x["w"], w2)
        return dspark_loss(out, cfg, vocab_chunk=32, impl=impl)

    grads = {}
    for impl in ("xla", "pallas"):
        f = jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2, 3), has_aux=True),
                    compiler_options=FAST_COMPILE)
        grads[impl] = f(x["hd"], x["u"], x["w2"], conf)
    (lx, mx), gx = grads["xla"]
    (lp, mp), gp = grads["pallas"]
    assert abs(float(lx - lp)) <= 1e-5
    assert all(abs(float(mx[k] - mp[k])) <= 1e-5 for k in mx)
    assert all(max_err(a, b) <= 2e-5 for a, b in zip(gx, gp))


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_device(backend, platform):
    """Value and gradient lower for a real TPU (Mosaic) / GPU (Triton) with default tiles, bf16, Qwen-like odd
    sizes (H=320, V not a multiple of the tile). Lowering only: no device here, so no device compile/run."""
    s = jax.ShapeDtypeStruct
    lead, h, v, r = (1, 40, 7), 320, 1000, 128

    def loss(hd, ht, u, w, w2, ids):
        ce, l1 = vl.vocab_loss_fused(hd, ht, u, w, w2, ids, backend=backend)
        return jnp.sum(ce) + jnp.sum(l1)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 4)))
    args = (s(lead + (h,), jnp.bfloat16), s(lead + (h,), jnp.bfloat16), s(lead + (r,), jnp.bfloat16),
            s((v, h), jnp.bfloat16), s((v, r), jnp.bfloat16), s(lead, jnp.int32))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(f, platforms=[platform], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert ("tpu_custom_call" in text) if backend == "tpu" else ("triton" in text)


def test_fused_loss_cuts_peak_memory():
    """XLA's compiled plan for value+grad (what training differentiates): the dense reference holds [rows, V]
    fp32 arrays, the fused algorithm (its plain-XLA driver) and the scan do not."""
    rows, h, v, r = 448, 128, 16384, 32
    s = jax.ShapeDtypeStruct
    args = (s((rows, h), jnp.float32), s((rows, h), jnp.float32), s((rows, r), jnp.float32),
            s((v, h), jnp.float32), s((v, r), jnp.float32), s((rows,), jnp.int32))

    def temp(fn):
        loss = lambda hd, ht, u, w, w2, ids: sum(jnp.sum(z) for z in fn(hd, ht, u, w, w2, ids))  # noqa: E731
        c = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 4))).lower(*args).compile()
        return c.memory_analysis().temp_size_in_bytes

    dense = temp(vl.vocab_loss_reference)
    fused = temp(functools.partial(vl.vocab_loss_fused, backend="xla", vocab_tile=1024))
    scan = temp(functools.partial(vl.vocab_loss, chunk=1024, impl="xla"))
    assert dense >= 10 * fused, (dense, fused)
    assert dense >= 4 * scan, (dense, scan)


# ---- final-logit softcap (Gemma4): cap * tanh(x / cap) on the lm_head logits, Markov bias added after ----------
CAP = 2.0     # below the logits' spread here (|x| up to ~8), so the cap really bends them


def capped(backend):
    if backend == "scan":                                            # the autodiff scan in train/loss.py
        return lambda *a: slot_ce_l1_chunked(*a, 16, softcap=CAP)
    return functools.partial(pallas_fn(backend), softcap=CAP)


@pytest.mark.parametrize("backend,markov", [("tpu-interpret", True), ("gpu-interpret", True), ("xla", True),
                                            ("xla", False), ("scan", True), ("dense", True)])
def test_softcap_fp32_matches_reference(backend, markov):
    x, ids, wce, wl1 = make_inputs(markov=markov)
    argnums = (0, 1, 2, 3, 4) if markov else (0, 1, 3)
    ref = run(functools.partial(vl.vocab_loss_reference, softcap=CAP), x, ids, wce, wl1, argnums)
    uncapped = run(vl.vocab_loss_reference, x, ids, wce, wl1, argnums)
    assert max_err(ref[1], uncapped[1]) > 0.1                      # the cap matters on these inputs
    got = run(capped(backend), x, ids, wce, wl1, argnums)
    assert_close(got, ref, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_bf16_matches_reference(backend):
    assert_bf16_close(functools.partial(vl.vocab_loss_reference, softcap=CAP), capped(backend))


def test_softcap_dispatch_and_reference_agree_with_materialised_logits():
    """The reference with a cap equals CE/L1 of explicitly capped logits; vocab_loss passes the cap to both
    implementations."""
    x, ids, _, _ = make_inputs(lead=(3, 4))
    args = [x[n] for n in ARGS] + [ids]
    hp = jax.lax.Precision.HIGHEST
    d = CAP * jnp.tanh(jnp.einsum("...h,vh->...v", x["hd"], x["w"], precision=hp) / CAP) + jnp.einsum(
        "...r,vr->...v", x["u"], x["w2"], precision=hp)
    t = CAP * jnp.tanh(jnp.einsum("...h,vh->...v", x["ht"], x["w"], precision=hp) / CAP)
    want = vl.ce_l1_from_logits(d, t, ids)
    ref = vl.vocab_loss_reference(*args, softcap=CAP)
    assert max(max_err(a, b) for a, b in zip(ref, want)) <= 1e-5
    for impl in ("xla", "pallas"):
        got = jax.jit(functools.partial(vl.vocab_loss, chunk=16, impl=impl, row_tile=8, vocab_tile=16, softcap=CAP),
                      compiler_options=FAST_COMPILE)(*args)
        assert max(max_err(a, b) for a, b in zip(got, want)) <= 2e-5, impl
