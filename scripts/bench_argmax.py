"""Times ``jnp.argmax`` against ``dspark_jax.decode.sampling.argmax_last`` (max, then min over the maximal
indices) inside a jitted loop, at the decode loop's shapes. On XLA's CPU backend argmax is a variadic reduction
that is not vectorised; this shows by how much.

    python scripts/bench_argmax.py [--iters 200]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp

from dspark_jax.decode.sampling import argmax_last

SHAPES = [(1, 2048), (1, 7, 2048), (8, 7, 2048), (1, 151936), (8, 151936)]


def _time(fn, x, iters: int) -> float:
    @jax.jit
    def loop(x):
        def body(i, acc):   # the carry feeds back so the work is not hoisted out of the loop
            return acc + fn(x + acc.astype(x.dtype) * 1e-30).sum()
        return jax.lax.fori_loop(0, iters, body, jnp.int32(0))

    jax.block_until_ready(loop(x))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x))
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), jax {jax.__version__}")
    print("| shape | jnp.argmax us | argmax_last us | ratio | same |")
    print("|---|---:|---:|---:|---|")
    for shape in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape)
        a = _time(lambda v: jnp.argmax(v, axis=-1).astype(jnp.int32), x, args.iters)
        b = _time(argmax_last, x, args.iters)
        same = bool((jnp.argmax(x, axis=-1) == argmax_last(x)).all())
        print(f"| {list(shape)} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.1f}x | {same} |")


if __name__ == "__main__":
    main()
