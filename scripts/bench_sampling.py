"""Times the greedy and sampled token choice of the decode loops inside a jitted loop, against the formulations
they replaced, on XLA's CPU backend in particular:

* argmax: ``jnp.argmax`` (a variadic reduction XLA's CPU backend does not vectorise) vs
  ``dspark_jax.decode.sampling.argmax_last`` (a max, then a min over the indices reaching it);
* one sampling step (``sample_tokens``: warp, then draw) vs the previous one (a sort of the whole vocabulary for
  top-p, ``jax.random.categorical``'s argmax), at the DeepSpec data-generation settings (T 0.7, top-k 20,
  top-p 0.8) and at plain T=1.

    python scripts/bench_sampling.py [--iters 50]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from dspark_jax.decode.sampling import SamplingConfig, argmax_last, sample_tokens


def _previous_sample(logits, key, cfg):
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        x = jnp.where(x < jax.lax.top_k(x, cfg.top_k)[0][..., -1:], -jnp.inf, x)
    if cfg.top_p < 1.0:
        sorted_x = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def _seconds_per_call(fn, x, iters: int, keyed: bool = True) -> float:
    """Best of 3 of ``iters`` calls ``fn(x', key_i)`` (``key_i`` None unless ``keyed``) in one jitted loop; the
    carry feeds back into x so the work is not hoisted out of the loop."""
    @jax.jit
    def loop(x):
        def body(i, acc):
            key = jax.random.fold_in(jax.random.key(0), i) if keyed else None
            return acc + fn(x + acc.astype(x.dtype) * 1e-30, key).sum()
        return jax.lax.fori_loop(0, iters, body, jnp.int32(0))

    jax.block_until_ready(loop(x))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x))
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; microseconds per call")
    print("\n| shape | jnp.argmax us | argmax_last us | ratio | same |")
    print("|---|---:|---:|---:|---|")
    for shape in [(1, 2048), (1, 7, 2048), (8, 7, 2048), (1, 151936), (8, 151936)]:
        x = jax.random.normal(jax.random.key(0), shape)
        a = _seconds_per_call(lambda v, k: jnp.argmax(v, axis=-1).astype(jnp.int32), x, args.iters, keyed=False)
        b = _seconds_per_call(lambda v, k: argmax_last(v), x, args.iters, keyed=False)
        same = bool((jnp.argmax(x, axis=-1) == argmax_last(x)).all())
        print(f"| {list(shape)} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.1f}x | {same} |")
    print("\n| rows x V | sampling | previous us | now us | ratio |")
    print("|---|---|---:|---:|---:|")
    for rows, v in ((1, 2048), (16, 2048), (1, 151936), (8, 151936)):
        x = jax.random.normal(jax.random.key(1), (rows, v)) * 3
        for cfg in (SamplingConfig(0.7, 20, 0.8), SamplingConfig(1.0)):
            a = _seconds_per_call(lambda l, k, cfg=cfg: _previous_sample(l, k, cfg), x, args.iters)
            b = _seconds_per_call(lambda l, k, cfg=cfg: sample_tokens(l, k, cfg), x, args.iters)
            name = f"T {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}"
            print(f"| {rows} x {v} | {name} | {a * 1e6:.0f} | {b * 1e6:.0f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
