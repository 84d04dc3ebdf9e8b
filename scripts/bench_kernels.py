#!/usr/bin/env python
"""Benchmark the attention kernels against their XLA references.

  python scripts/bench_kernels.py                     # realistic shapes on GPU/TPU, tiny ones on CPU
  python scripts/bench_kernels.py --shapes realistic  # force the Qwen3-4B geometry
  python scripts/bench_kernels.py --kernel ragged --json out.json

Kernels:
  block   DSpark training block attention (spec §1.5), forward and forward+backward. Qwen3-4B draft geometry:
          32 q heads, 8 kv heads, head_dim 128; S = 1k / 4k context, N = 512 anchors, Bs = 7.
  ragged  verify/decode attention over per-row caches: 8-256 rows of 1-8 query tokens over 1k-8k cached tokens.

For each shape it prints the kernel's and the reference's time (median of --iters), the speed-up, and the
kernel's achieved rate against the device's peak: FLOP/s over the *visible* (unmasked) score entries for the
training kernel, bytes/s of KV cache read for the ragged kernel. On CPU the Pallas kernels run in interpret
mode, so the numbers only show that the script works: timings need a GPU or TPU.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import parser, write_json
from _bench_jax import median_time

from dspark_jax import kernels

# (bf16 dense matmul FLOP/s, HBM bytes/s) by device_kind substring (first match wins).
PEAKS = [
    ("H200", 989e12, 4.8e12), ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12), ("L4", 121e12, 0.3e12),
    ("TPU v6", 918e12, 1.64e12), ("TPU v5p", 459e12, 2.76e12), ("TPU v5", 197e12, 0.82e12),
    ("TPU v4", 275e12, 1.2e12),
]


def device_peak():
    kind = jax.devices()[0].device_kind
    for key, flops, bw in PEAKS:
        if key.lower() in kind.lower():
            return kind, flops, bw
    return kind, None, None


def timeit(fn, *args, iters: int) -> float:
    return median_time(lambda: fn(*args), iters)[1]


def block_shapes(kind: str):
    if kind == "tiny":
        return [dict(b=1, s=64, n=8, bs=7, nh=4, nkv=2, hd=16)]
    return [dict(b=1, s=s, n=512, bs=7, nh=32, nkv=8, hd=128) for s in (1024, 4096)]


def ragged_shapes(kind: str):
    if kind == "tiny":
        return [dict(rows=4, tokens=1, ctx=64, nh=4, nkv=2, hd=16), dict(rows=4, tokens=4, ctx=64, nh=4, nkv=2, hd=16)]
    return [dict(rows=r, tokens=t, ctx=c, nh=32, nkv=8, hd=128)
            for r, t, c in [(8, 1, 1024), (8, 8, 8192), (64, 1, 4096), (64, 8, 4096), (256, 1, 1024),
                            (256, 8, 1024), (256, 4, 8192)]]


def bench_block(shape, dtype, iters, peak_flops):
    b, s, n, bs, nh, nkv, hd = (shape[k] for k in ("b", "s", "n", "bs", "nh", "nkv", "hd"))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, n * bs, nh, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s + n * bs, nkv, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s + n * bs, nkv, hd)), dtype)
    anchors = jnp.asarray(np.sort(rng.integers(0, s - bs, size=(b, n)), axis=1), jnp.int32)
    keep = jnp.asarray(rng.random((b, n)) < 0.9)
    scale = hd ** -0.5
    visible = float(np.sum(np.where(np.asarray(keep), np.asarray(anchors) + bs, 0))) * bs * nh   # q-k pairs x heads
    rows = []
    for impl in ("pallas", "xla"):
        f = jax.jit(lambda q, k, v, impl=impl: kernels.dspark_block_attention(q, k, v, anchors, keep, scale,
                                                                                block_size=bs, impl=impl))
        g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(kernels.dspark_block_attention(
            q, k, v, anchors, keep, scale, block_size=bs, impl=impl).astype(jnp.float32)), argnums=(0, 1, 2)))
        rows.append((impl, timeit(f, q, k, v, iters=iters), timeit(g, q, k, v, iters=iters)))
    res = dict(kernel="block", **shape, dtype=jnp.dtype(dtype).name, visible_pairs=visible)
    for impl, tf, tb in rows:
        res[f"{impl}_fwd_s"], res[f"{impl}_fwdbwd_s"] = tf, tb
    res["speedup_fwd"] = res["xla_fwd_s"] / res["pallas_fwd_s"]
    res["speedup_fwdbwd"] = res["xla_fwdbwd_s"] / res["pallas_fwdbwd_s"]
    flops_fwd = 4 * visible * hd                      # QK^T and PV over the visible pairs
    flops_fb = flops_fwd * 3.5                        # + backward: QK^T again, dV, dP, dQ, dK
    res["pallas_fwd_tflops"] = flops_fwd / res["pallas_fwd_s"] / 1e12
    res["pallas_fwdbwd_tflops"] = flops_fb / res["pallas_fwdbwd_s"] / 1e12
    if peak_flops:
        res["pallas_fwd_pct_peak"] = 100 * flops_fwd / res["pallas_fwd_s"] / peak_flops
        res["pallas_fwdbwd_pct_peak"] = 100 * flops_fb / res["pallas_fwdbwd_s"] / peak_flops
    return res


def bench_ragged(shape, dtype, iters, peak_bw):
    r, tpr, ctx, nh, nkv, hd = (shape[k] for k in ("rows", "tokens", "ctx", "nh", "nkv", "hd"))
    rng = np.random.default_rng(0)
    cap = ctx
    lens = rng.integers(ctx // 2, ctx + 1, size=r)                             # cached tokens per row
    row = np.repeat(np.arange(r), tpr).astype(np.int32)
    kv_len = (lens[row] - tpr + 1 + np.tile(np.arange(tpr), r)).astype(np.int32)   # causal verify
    t = r * tpr
    q = jnp.asarray(rng.normal(size=(t, nh, hd)), dtype)
    kc = jnp.asarray(rng.normal(size=(r, cap, nkv, hd)), dtype)
    vc = jnp.asarray(rng.normal(size=(r, cap, nkv, hd)), dtype)
    row, kv_len = jnp.asarray(row), jnp.asarray(kv_len)
    scale = hd ** -0.5
    res = dict(kernel="ragged", **shape, dtype=jnp.dtype(dtype).name)
    for impl in ("pallas", "xla"):
        f = jax.jit(lambda q, kc, vc, impl=impl: kernels.ragged_attention(q, kc, vc, row, kv_len, scale, impl=impl))
        res[f"{impl}_s"] = timeit(f, q, kc, vc, iters=iters)
    kv_bytes = float(np.sum(lens)) * nkv * hd * 2 * jnp.dtype(dtype).itemsize     # K and V read once per row
    res["kv_bytes"] = kv_bytes
    res["speedup"] = res["xla_s"] / res["pallas_s"]
    res["pallas_GBps"] = kv_bytes / res["pallas_s"] / 1e9
    if peak_bw:
        res["pallas_pct_peak_bw"] = 100 * kv_bytes / res["pallas_s"] / peak_bw
    return res


def block_line(r, peak_flops) -> str:
    return (f"block  S={r['s']:5d} N={r['n']} Bs={r['bs']} h={r['nh']}/{r['nkv']}x{r['hd']}: "
            f"fwd pallas {r['pallas_fwd_s'] * 1e3:9.3f} ms  xla {r['xla_fwd_s'] * 1e3:9.3f} ms "
            f"(x{r['speedup_fwd']:.2f}) | fwd+bwd pallas {r['pallas_fwdbwd_s'] * 1e3:9.3f} ms  "
            f"xla {r['xla_fwdbwd_s'] * 1e3:9.3f} ms (x{r['speedup_fwdbwd']:.2f}) | "
            f"{r['pallas_fwd_tflops']:.3f}/{r['pallas_fwdbwd_tflops']:.3f} TFLOP/s"
            + (f" = {r['pallas_fwd_pct_peak']:.1f}%/{r['pallas_fwdbwd_pct_peak']:.1f}% of peak" if peak_flops else ""))


def ragged_line(r, peak_bw) -> str:
    return (f"ragged rows={r['rows']:3d} x {r['tokens']} tok, cache {r['ctx']:5d}: "
            f"pallas {r['pallas_s'] * 1e3:9.3f} ms  xla {r['xla_s'] * 1e3:9.3f} ms (x{r['speedup']:.2f}) | "
            f"{r['pallas_GBps']:.1f} GB/s" + (f" = {r['pallas_pct_peak_bw']:.1f}% of peak" if peak_bw else ""))


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--kernel", choices=("block", "ragged", "all"), default="all")
    p.add_argument("--shapes", choices=("auto", "tiny", "realistic"), default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    backend = jax.default_backend()
    on_accel = backend in ("gpu", "tpu")
    shapes = a.shapes if a.shapes != "auto" else ("realistic" if on_accel else "tiny")
    iters = a.iters or (20 if on_accel else 2)
    kind, peak_flops, peak_bw = device_peak()
    dtype = jnp.dtype(a.dtype)
    print(f"device: {kind} ({backend}); peak bf16 {peak_flops and peak_flops / 1e12} TFLOP/s, "
          f"HBM {peak_bw and peak_bw / 1e9} GB/s; shapes={shapes} dtype={dtype.name} iters={iters}")
    if not on_accel:
        print("NOTE: no GPU/TPU: the Pallas kernels run in interpret mode, so these timings say nothing about "
              "kernel speed; run on a GPU or TPU for real numbers.")
    # kernel -> (its shapes, its benchmark, the peak it is held to, its printed line)
    benches = {"block": (block_shapes, bench_block, peak_flops, block_line),
               "ragged": (ragged_shapes, bench_ragged, peak_bw, ragged_line)}
    results = []
    for name, (shapes_of, bench, peak, line) in benches.items():
        if a.kernel in (name, "all"):
            for shape in shapes_of(shapes):
                r = bench(shape, dtype, iters, peak)
                results.append(r)
                print(line(r, peak), flush=True)
    write_json(a.json, dict(device=kind, backend=backend, shapes=shapes, results=results), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
