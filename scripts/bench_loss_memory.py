"""Peak memory of the DSpark loss (value and gradient): materialised [B,N,Bs,V] logits vs vocab chunks.

Measures XLA's compiled memory plan (``memory_analysis``: temporaries + outputs) for the loss and its
gradient w.r.t. the draft hidden states, Markov vectors and confidence logits, at a Qwen3-sized vocab,
and checks both paths give the same loss. Usage:

    python scripts/bench_loss_memory.py [--vocab 151936] [--hidden 1024] [--blocks 128] [--chunk 8192]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import add_options, machine, parser, write_json
from _bench_jax import device_kind

from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.dspark import DraftTrainOutput
from dspark_jax.train.loss import dspark_loss


def main(argv=None):
    ap = parser(__doc__)
    add_options(ap, vocab=151936, hidden=1024, rank=256)
    ap.add_argument("--blocks", type=int, default=128, help="N anchored blocks (one sequence)")
    add_options(ap, block_size=7, chunk=8192, json_out=None)
    args = ap.parse_args(argv)
    b, n, bs, h, v, r = 1, args.blocks, args.block_size, args.hidden, args.vocab, args.rank
    cfg = DraftConfig(block_size=bs, markov_rank=r)
    k = jax.random.split(jax.random.key(0), 6)
    hidden = jax.random.normal(k[0], (b, n, bs, h)) * 0.5
    tgt = jax.random.normal(k[1], (b, n, bs, h)) * 0.5
    u = jax.random.normal(k[2], (b, n, bs, r)) * 0.1
    lm_head = jax.random.normal(k[3], (v, h)) * 0.02
    w2 = jax.random.normal(k[4], (v, r)) * 0.02
    ids = jax.random.randint(k[5], (b, n, bs), 0, v)
    mask = jnp.ones((b, n, bs))
    conf = jnp.zeros((b, n, bs))

    def loss_fn(hidden, u, conf, tgt, lm_head, w2, ids, mask, chunk):
        full = chunk is None
        d_logits = (jnp.einsum("...h,vh->...v", hidden, lm_head) + jnp.einsum("...r,vr->...v", u, w2)) if full else None
        t_logits = jnp.einsum("...h,vh->...v", tgt, lm_head) if full else None
        out = DraftTrainOutput(d_logits, t_logits, conf, ids, mask, hidden, tgt, u, lm_head, w2)
        return dspark_loss(out, cfg, vocab_chunk=chunk)[0]

    results = {}
    for name, chunk in (("materialised", None), (f"chunked_{args.chunk}", args.chunk)):
        # weights are arguments, not closed-over constants (XLA would constant-fold them at compile time)
        f = jax.jit(jax.value_and_grad(lambda *xs: loss_fn(*xs, chunk), argnums=(0, 1, 2)))
        operands = (hidden, u, conf, tgt, lm_head, w2, ids, mask)
        compiled = f.lower(*operands).compile()
        mem = compiled.memory_analysis()
        t0 = time.perf_counter()
        val, _ = compiled(*operands)
        val = float(jax.block_until_ready(val))
        results[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
                         "loss": val, "seconds": time.perf_counter() - t0}
    names = list(results)
    a, c = results[names[0]], results[names[1]]
    print(f"B={b} N={n} Bs={bs} H={h} V={v} r={r} on {device_kind()} ({machine()})")
    for name, res in results.items():
        print(f"  {name:>16}: temp {res['temp_bytes'] / 2**20:9.1f} MiB, loss {res['loss']:.6f}, "
              f"value+grad {res['seconds']:.2f}s")
    print(f"  peak temporaries: {a['temp_bytes'] / max(c['temp_bytes'], 1):.1f}x smaller with chunks; "
          f"|loss difference| = {abs(a['loss'] - c['loss']):.2e}")
    assert np.isclose(a["loss"], c["loss"], rtol=1e-5, atol=1e-5)
    write_json(args.json_out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
