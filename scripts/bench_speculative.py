"""Speculative vs plain autoregressive decoding of the same target, in one run.

Pairs (each honest about what it is):
  random  - a freshly initialised DSpark draft: tau ~ 1, so this measures the loop's overhead;
  oracle  - a bigram target and a draft whose Markov head holds the target's exact bigram table
            (dspark_jax.testing): every draft is accepted, tau = block_size + 1, an upper bound.
A trained pair replaces these once the demo/training issues land.

    python scripts/bench_speculative.py [--hidden 256] [--layers 8] [--vocab 1024] [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

import dspark_jax as dj
from dspark_jax.testing import make_bigram, make_oracle_draft


def _timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    h, v = args.hidden, args.vocab
    cfg = dj.TargetConfig(model_type="qwen3", vocab_size=v, hidden_size=h, intermediate_size=3 * h,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
                          num_key_value_heads=max(1, h // 128), head_dim=64, initializer_range=0.1)
    taps = tuple(int(i) for i in np.linspace(1, args.layers - 2, 3).round())
    dcfg = dj.DraftConfig(block_size=args.block_size, mask_token_id=v - 1, target_layer_ids=taps,
                          markov_rank=v, num_draft_layers=args.draft_layers)
    pairs = {}
    plain = dj.build_target(cfg, seed=0)
    pairs["random"] = (plain, dj.build_draft(plain, dcfg, seed=1))
    bigram = make_bigram(dj.build_target(cfg, seed=0))
    pairs["oracle"] = (bigram, make_oracle_draft(bigram, dj.build_draft(bigram, dcfg, seed=1), scale=1.0))
    rng = np.random.default_rng(0)
    rows = []
    print(f"target H={h} L={args.layers} V={v}; draft D={args.draft_layers} Bs={args.block_size} r={v}; "
          f"T={args.temperature}; {args.new_tokens} new tokens; device {jax.devices()[0].device_kind}")
    for name, (target, draft) in pairs.items():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            prompts = rng.integers(0, v - 1, (b, args.prompt_len)).tolist()
            kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, stop_token_ids=(), seed=0)
            ar, t_ar = _timed(lambda: dj.generate(target, prompts, **kw), args.repeats)
            sp, t_sp = _timed(lambda: dj.speculative_generate(target, draft, prompts, **kw), args.repeats)
            same = bool((ar.tokens == sp.tokens).all()) if args.temperature == 0 else None
            row = {"pair": name, "batch": b, "plain_tok_s": b * args.new_tokens / t_ar,
                   "spec_tok_s": b * args.new_tokens / t_sp, "speedup": t_ar / t_sp, "tau": sp.stats["tau"],
                   "rounds": sp.stats["rounds"], "greedy_identical": same}
            rows.append(row)
            print(f"  {name:>6} B={b:<3} plain {row['plain_tok_s']:8.1f} tok/s | speculative "
                  f"{row['spec_tok_s']:8.1f} tok/s | x{row['speedup']:.2f} | tau {row['tau']:.2f} | "
                  f"identical={same}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "machine": platform.platform(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
