"""The fused vocab loss under a sharded jit (kernels/vocab_loss.py, ``_row_sharded``): rows split over the batch
mesh axes, weights replicated or FSDP/tensor-sharded. Pallas in interpret mode on 8 fake CPU devices
(tests/conftest.py): values and gradients equal the unsharded reference, the per-row outputs and activation
gradients stay row-sharded, and the compiled program gathers only the weights, never the activations."""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dspark_jax.sharding import make_mesh

vl = importlib.import_module("dspark_jax.kernels.vocab_loss")

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}
TILES = {"tpu-interpret": (8, 16), "gpu-interpret": (16, 16)}
ROWS = ("data", "fsdp")                       # the trainer's batch axes (train/step.py BATCH_AXES)
LEAD, HIDDEN, VOCAB, RANK = (4, 3, 5), 40, 78, 24  # 15 rows a shard: partial row tiles; 78 = 4 tiles of 16 + 14


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def make_inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    x = {
        "hd": jax.random.normal(k[0], LEAD + (HIDDEN,)),
        "ht": jax.random.normal(k[1], LEAD + (HIDDEN,)),
        "u": jax.random.normal(k[2], LEAD + (RANK,)) * 0.5,
        "w": jax.random.normal(k[3], (VOCAB, HIDDEN)) * 0.3,
        "w2": jax.random.normal(k[4], (VOCAB, RANK)) * 0.3,
    }
    ids = jax.random.randint(k[5], LEAD, 0, VOCAB)
    wce = jax.random.uniform(k[6], LEAD) * (jax.random.uniform(k[7], LEAD) > 0.3)
    return x, ids, wce, 0.9 * wce


def place(mesh, x, ids, wce, wl1, weights):
    """Rows over (data, fsdp); weights replicated, or as the trainer's rules put them (vocab -> tensor,
    embed -> fsdp: see sharding.py DEFAULT_RULES)."""
    rows = NamedSharding(mesh, P(ROWS))
    wspec = {"replicated": P(), "fsdp": P("tensor", "fsdp")}[weights]
    put = lambda a, s: jax.device_put(a, s)  # noqa: E731
    xs = {n: put(a, NamedSharding(mesh, wspec) if n in ("w", "w2") else rows) for n, a in x.items()}
    return xs, put(ids, rows), put(wce, rows), put(wl1, rows)


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def value_and_grads(fn, n_out=2):
    def loss(hd, ht, u, w, w2, ids, wce, wl1):
        out = fn(hd, ht, u, w, w2, ids)
        return jnp.sum(wce * out[0]) + jnp.sum(wl1 * out[1]), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True), compiler_options=FAST_COMPILE)


def gathered_shapes(hlo: str):
    """Result shapes of every all-gather / all-to-all in a compiled module's text (an async start's result
    tuple holds the operand then the gathered array: the last shape is the result)."""
    ops = re.compile(r"\s(all-gather|all-gather-start|all-to-all)\(")
    out = []
    for line in hlo.splitlines():
        m = ops.search(line)
        if m and "=" in line[:m.start()]:
            lhs = line[line.index("=", 0, m.start()) + 1:m.start()]
            dims = re.findall(r"\w+\[([\d,]*)\]", lhs)
            out.append(tuple(int(d) for d in dims[-1].split(",") if d))
    return out


def is_weight(shape):
    """A (partly) gathered [V, H] / [V, r] weight: vocab split over "tensor" only, so V or V/2 rows (the
    activations have 60 rows, 15 a shard, or a leading batch dim of 4 / 1)."""
    return len(shape) == 2 and shape[0] in (VOCAB, VOCAB // 2) and shape[1] in (HIDDEN, RANK)


def check_sharded(f, args, hlo):
    """Per-row outputs and activation gradients keep the row sharding; only [V, .] weights are gathered."""
    (_, outs), grads = f(*args)
    for o in (*outs, grads[0], grads[1], grads[2]):
        assert tuple(o.sharding.spec)[:1] == (ROWS,), o.sharding
    shapes = gathered_shapes(hlo)
    assert all(is_weight(s) for s in shapes), shapes
    return shapes


@pytest.mark.parametrize("backend,weights", [("tpu-interpret", "fsdp"), ("gpu-interpret", "fsdp"),
                                             ("tpu-interpret", "replicated")])
def test_sharded_rows_match_reference(mesh, backend, weights):
    x, ids, wce, wl1 = make_inputs()
    tr, tv = TILES[backend]
    fused = functools.partial(vl.vocab_loss_fused, backend=backend, row_tile=tr, vocab_tile=tv)
    args = place(mesh, x, ids, wce, wl1, weights)
    flat = (*(args[0][n] for n in ("hd", "ht", "u", "w", "w2")), *args[1:])
    f = value_and_grads(fused)
    (val, (ce, l1)), grads = f(*flat)
    (rval, (rce, rl1)), rgrads = value_and_grads(vl.vocab_loss_reference)(
        *(x[n] for n in ("hd", "ht", "u", "w", "w2")), ids, wce, wl1)
    assert abs(float(val - rval)) <= 1e-4
    assert max_err(ce, rce) <= 2e-5 and max_err(l1, rl1) <= 2e-5
    for g, r in zip(grads, rgrads):
        assert max_err(g, r) <= 2e-5
    shapes = check_sharded(f, flat, f.lower(*flat).compile().as_text())
    if weights == "replicated":
        assert shapes == []
    else:
        assert shapes                      # the weights were sharded: gathering them is the point


def test_sharded_soft_targets_match_reference(mesh):
    """The soft-target (Eagle3) variant under the same mesh, gradients w.r.t. draft, target and lm_head."""
    x, _, wce, wl1 = make_inputs(seed=1)
    args = place(mesh, x, jnp.zeros(LEAD, jnp.int32), wce, wl1, "fsdp")

    def loss(fn):
        def f(hd, ht, w, wce, wl1):
            ce, l1, match = fn(hd, ht, w)
            return jnp.sum(wce * ce) + jnp.sum(wl1 * l1), (ce, l1, match)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True), compiler_options=FAST_COMPILE)

    fused = loss(functools.partial(vl.soft_vocab_loss_fused, backend="tpu-interpret", row_tile=8, vocab_tile=16))
    a = (args[0]["hd"], args[0]["ht"], args[0]["w"], args[2], args[3])
    (val, outs), grads = fused(*a)
    (rval, routs), rgrads = loss(vl.soft_vocab_loss_reference)(x["hd"], x["ht"], x["w"], wce, wl1)
    assert abs(float(val - rval)) <= 1e-4
    assert max_err(outs[0], routs[0]) <= 2e-5 and max_err(outs[1], routs[1]) <= 2e-5
    assert np.array_equal(np.asarray(outs[2]), np.asarray(routs[2]))
    for g, r in zip(grads, rgrads):
        assert max_err(g, r) <= 2e-5
    for o in (*outs, grads[0], grads[1]):
        assert tuple(o.sharding.spec)[:1] == (ROWS,), o.sharding
    shapes = gathered_shapes(fused.lower(*a).compile().as_text())
    assert shapes and all(is_weight(s) for s in shapes), shapes


def test_gathered_shapes_parser():
    hlo = ("  %all-gather.1 = f32[77,40]{1,0} all-gather(f32[39,40]{1,0} %p), channel_id=1, dimensions={0}\n"
           "  %ag = (f32[15,40]{1,0}, f32[60,40]{1,0}) all-gather-start(f32[15,40]{1,0} %q)\n"
           "  %x = f32[60,40]{1,0} all-gather(f32[15,40]{1,0} %q), dimensions={0}\n")
    assert gathered_shapes(hlo) == [(77, 40), (60, 40), (60, 40)]
