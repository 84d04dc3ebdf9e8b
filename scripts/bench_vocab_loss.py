"""Peak memory and speed of the DSpark loss's vocab reduction: dense reference vs the fused paths.

1. Memory at the Qwen3-4B geometry (H=2560, V=151936, N=512 anchors x Bs=7 slots, Markov rank 256, one
   sequence): XLA's compiled plan (``jax.jit(...).lower(abstract shapes).compile().memory_analysis()``) for
   value + gradient w.r.t. what training differentiates (draft hidden, Markov u and W2; lm_head frozen, target
   hidden stop_gradient). Nothing is run at this size. ``temp`` is XLA's temporaries (the peak working set
   beyond arguments and outputs).
2. Values and time at a small shape: all paths run, max |difference| to the dense reference.

Paths: ``dense`` = ``vocab_loss_reference`` ([rows, V] fp32 logits); ``xla (scan)`` = the autodiff'd chunked
scan (``impl="xla"``, kernels/vocab_loss_chunked.py); ``fused (XLA driver)`` = the fused kernel's algorithm (two
vocab passes, hand-written backward) as plain XLA ops (``vocab_loss_fused(backend="xla")``), which XLA's memory plan
can see on any backend; ``pallas-<backend>`` = the Pallas kernels (on CPU in interpret mode: the plan is the
interpreter's, which copies operands per call, and its speed is not the kernel's). Usage::

    python scripts/bench_vocab_loss.py [--dtype bfloat16] [--chunk 8192] [--skip-pallas-memory]
"""

from __future__ import annotations

import functools
import importlib
import time

import jax
import jax.numpy as jnp
from _bench_common import add_options, parser

from dspark_jax.kernels._dispatch import resolve

vl = importlib.import_module("dspark_jax.kernels.vocab_loss")  # the module: the package exports a function so named

FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def loss_of(fn):
    def loss(hd, ht, u, w, w2, ids, wce, wl1):
        ce, l1 = fn(hd, ht, u, w, w2, ids)
        return jnp.sum(wce * ce) + jnp.sum(wl1 * l1)
    return loss


def paths(chunk, pallas_backend):
    out = {"dense": vl.vocab_loss_reference,
           "xla (scan)": functools.partial(vl.vocab_loss, chunk=chunk, impl="xla"),
           "fused (XLA driver)": functools.partial(vl.vocab_loss_fused, backend="xla")}
    if pallas_backend:
        out[f"pallas-{pallas_backend}"] = functools.partial(vl.vocab_loss_fused, backend=pallas_backend)
    return out


def shapes(rows, h, v, r, dtype):
    s = jax.ShapeDtypeStruct
    return (s((rows, h), dtype), s((rows, h), dtype), s((rows, r), dtype), s((v, h), dtype), s((v, r), dtype),
            s((rows,), jnp.int32), s((rows,), jnp.float32), s((rows,), jnp.float32))


def memory_table(args, pallas_backend):
    rows = args.blocks * args.block_size
    dt = jnp.dtype(args.dtype)
    print(f"### Peak memory, value+grad, Qwen3-4B geometry: rows = N*Bs = {args.blocks}*{args.block_size} = "
          f"{rows}, H={args.hidden}, V={args.vocab}, r={args.rank}, {dt.name} inputs ({jax.devices()[0].platform})\n")
    print("| path | temp (MiB) | output (MiB) | arguments (MiB) | temp vs dense |")
    print("|---|---:|---:|---:|---:|")
    res = {}
    for name, fn in paths(args.chunk, pallas_backend).items():
        if name.startswith("pallas") and args.skip_pallas_memory:
            continue
        t0 = time.perf_counter()
        f = jax.jit(jax.value_and_grad(loss_of(fn), argnums=(0, 2, 4)))
        try:
            mem = f.lower(*shapes(rows, args.hidden, args.vocab, args.rank, dt)).compile().memory_analysis()
        except Exception as e:  # noqa: BLE001  (report and go on)
            print(f"| {name} | failed: {type(e).__name__} | | | |")
            continue
        res[name] = mem
        ratio = res["dense"].temp_size_in_bytes / max(mem.temp_size_in_bytes, 1)
        print(f"| {name} | {mem.temp_size_in_bytes / 2**20:,.1f} | {mem.output_size_in_bytes / 2**20:,.1f} | "
              f"{mem.argument_size_in_bytes / 2**20:,.1f} | {ratio:,.1f}x smaller |"
              + (f"  <!-- compiled in {time.perf_counter() - t0:.0f}s -->" if args.verbose else ""))
    print()
    return res


def speed_table(args, pallas_backend):
    rows, h, v, r = args.small_rows, args.small_hidden, args.small_vocab, args.small_rank
    k = jax.random.split(jax.random.key(0), 8)
    dt = jnp.dtype(args.dtype)
    x = (jax.random.normal(k[0], (rows, h), dt), jax.random.normal(k[1], (rows, h), dt),
         (jax.random.normal(k[2], (rows, r)) * 0.5).astype(dt), (jax.random.normal(k[3], (v, h)) * 0.05).astype(dt),
         (jax.random.normal(k[4], (v, r)) * 0.05).astype(dt), jax.random.randint(k[5], (rows,), 0, v),
         jax.random.uniform(k[6], (rows,)), jax.random.uniform(k[7], (rows,)))
    print(f"### Values and time at a small shape: rows={rows}, H={h}, V={v}, r={r}, {dt.name} inputs "
          f"({jax.devices()[0].platform}; Pallas in interpret mode off TPU/GPU)\n")
    print("| path | loss | max abs err CE | max abs err L1 | max abs err grads | value+grad (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = None
    for name, fn in paths(args.chunk_small, pallas_backend).items():
        f = jax.jit(jax.value_and_grad(loss_of(fn), argnums=(0, 2, 4)),
                    compiler_options=FAST_COMPILE if name.startswith("pallas") else None)
        vals = jax.jit(lambda *a, fn=fn: fn(*a[:6]))(*x)
        (val, grads) = jax.block_until_ready(f(*x))
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(f(*x))
        ms = (time.perf_counter() - t0) / args.repeats * 1e3
        if ref is None:
            ref = (val, vals, grads)
        err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
        print(f"| {name} | {float(val):.6f} | {err(vals[0], ref[1][0]):.2e} | {err(vals[1], ref[1][1]):.2e} | "
              f"{max(err(g, q) for g, q in zip(grads, ref[2])):.2e} | {ms:,.1f} |")
    print()


def main(argv=None):
    ap = parser(__doc__)
    # the memory table's geometry (Qwen3-4B), then the small shape that the speed table runs
    add_options(ap, hidden=2560, vocab=151936, rank=256, blocks=512, block_size=7, dtype="bfloat16")
    ap.add_argument("--chunk", type=int, default=8192, help="vocab chunk of the XLA scan")
    ap.add_argument("--skip-pallas-memory", action="store_true", help="skip the (slow to compile) Pallas plan")
    add_options(ap, small_rows=7 * 37, small_hidden=256, small_vocab=4099, small_rank=64, chunk_small=1024, repeats=3,
                verbose=False)
    args = ap.parse_args(argv)
    kind, target = resolve("pallas", "vocab_loss")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, Pallas target {target}\n")
    memory_table(args, target)
    speed_table(args, target)


if __name__ == "__main__":
    main()
