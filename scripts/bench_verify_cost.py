"""What a target forward over k new tokens of one row costs relative to a one-token decode step, by model size.

Speculative decoding pays when verifying k tokens costs much less than k decode steps. This measures
``cost(k) / cost(1)`` for a single row (batch 1) on the current device, for several random Qwen3 geometries:
each measurement runs 64 forwards inside one jitted ``fori_loop`` with the KV cache carried (so it is updated in
place, as in the decode loops) and rolled back after each forward, on a cache holding ``--context`` tokens.
With a measured draft cost ``d`` (in units of a decode step) a full-block round costs ``cost(Bs+1)/cost(1) + d``
decode steps, which is the acceptance length τ a draft must exceed to beat plain decoding ("break-even τ").

    python scripts/bench_verify_cost.py [--sizes 128x6,256x8,512x8] [--tokens 1,2,4,8] [--vocab 2048]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import dspark_jax as dj

STEPS = 64


def _target(hidden, layers, vocab):
    cfg = dj.TargetConfig(model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                          num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                          num_key_value_heads=max(1, hidden // 128), head_dim=64, initializer_range=0.02)
    return dj.build_target(cfg, seed=0)


def _per_forward_seconds(target, k, context, repeats):
    cache = target.init_cache(1, context + k + 1)
    cache = jax.jit(lambda c: target(jnp.ones((1, context), jnp.int32), c, return_logits=False).cache)(cache)
    ids = jnp.ones((1, k), jnp.int32)

    @jax.jit
    def run(c):
        def body(i, carry):
            c, acc = carry
            out = target(ids, c, logits_at=jnp.zeros((1, 1), jnp.int32) + (k - 1))
            return out.cache.crop(c.lengths), acc + out.logits[0, 0, 0]
        return jax.lax.fori_loop(0, STEPS, body, (c, jnp.float32(0)))[1]

    jax.block_until_ready(run(cache))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(cache))
        times.append((time.perf_counter() - t0) / STEPS)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x6,256x8,512x8", help="HIDDENxLAYERS,...")
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.tokens.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}; "
          f"batch 1, context {args.context}, V={args.vocab}, fp32\n")
    print("| target | params | fp32 MB | " + " | ".join(f"k={k} us" for k in ks) + " | "
          + " | ".join(f"cost({k})/cost(1)" for k in ks[1:]) + " |")
    print("|---|---:|---:|" + "---:|" * (2 * len(ks) - 1))
    for size in args.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        target = _target(hidden, layers, args.vocab)
        n = sum(x.size for x in jax.tree.leaves(jax.tree.map(lambda a: a, __import__("flax").nnx.state(target))))
        t = {k: _per_forward_seconds(target, k, args.context, args.repeats) for k in ks}
        print(f"| H={hidden}, {layers} layers | {n / 1e6:.1f}M | {n * 4 / 2**20:.0f} | "
              + " | ".join(f"{t[k] * 1e6:.0f}" for k in ks) + " | "
              + " | ".join(f"{t[k] / t[ks[0]]:.2f}" for k in ks[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
