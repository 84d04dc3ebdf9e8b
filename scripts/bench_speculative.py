"""Speculative vs plain autoregressive decoding of the same target, in one run.

Pairs (each honest about what it is):
  random  - a freshly initialised DSpark draft: tau ~ 1, so this measures the loop's overhead;
  oracle  - a bigram target and a draft whose Markov head holds the target's exact bigram table
            (dspark_jax.testing): every draft is accepted, tau = block_size + 1, an upper bound.
A trained pair replaces these once the demo/training issues land.

    python scripts/bench_speculative.py [--hidden 256] [--layers 8] [--vocab 1024] [--batch-sizes 1,8]
"""

from __future__ import annotations

import platform

import numpy as np
from _bench_common import add_options, parser, write_json
from _bench_jax import device_kind, median_time, random_qwen3_config, spread_taps

import dspark_jax as dj
from dspark_jax.testing import make_bigram, make_oracle_draft


def main(argv=None):
    ap = parser(__doc__)
    add_options(ap, hidden=256, layers=8, vocab=1024, draft_layers=2, block_size=7, batch_sizes="1,8", new_tokens=128,
                prompt_len=32, temperature=0.0, repeats=3, json_out=None)
    args = ap.parse_args(argv)
    h, v = args.hidden, args.vocab
    cfg = random_qwen3_config(h, args.layers, v, initializer_range=0.1)
    dcfg = dj.DraftConfig(block_size=args.block_size, mask_token_id=v - 1, target_layer_ids=spread_taps(args.layers, 1),
                          markov_rank=v, num_draft_layers=args.draft_layers)
    pairs = {}
    plain = dj.build_target(cfg, seed=0)
    pairs["random"] = (plain, dj.build_draft(plain, dcfg, seed=1))
    bigram = make_bigram(dj.build_target(cfg, seed=0))
    pairs["oracle"] = (bigram, make_oracle_draft(bigram, dj.build_draft(bigram, dcfg, seed=1), scale=1.0))
    rng = np.random.default_rng(0)
    rows = []
    print(f"target H={h} L={args.layers} V={v}; draft D={args.draft_layers} Bs={args.block_size} r={v}; "
          f"T={args.temperature}; {args.new_tokens} new tokens; device {device_kind()}")
    for name, (target, draft) in pairs.items():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            prompts = rng.integers(0, v - 1, (b, args.prompt_len)).tolist()
            kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, stop_token_ids=(), seed=0)
            ar, t_ar = median_time(lambda: dj.generate(target, prompts, **kw), args.repeats)
            sp, t_sp = median_time(lambda: dj.speculative_generate(target, draft, prompts, **kw), args.repeats)
            same = bool((ar.tokens == sp.tokens).all()) if args.temperature == 0 else None
            row = {"pair": name, "batch": b, "plain_tok_s": b * args.new_tokens / t_ar,
                   "spec_tok_s": b * args.new_tokens / t_sp, "speedup": t_ar / t_sp, "tau": sp.stats["tau"],
                   "rounds": sp.stats["rounds"], "greedy_identical": same}
            rows.append(row)
            print(f"  {name:>6} B={b:<3} plain {row['plain_tok_s']:8.1f} tok/s | speculative "
                  f"{row['spec_tok_s']:8.1f} tok/s | x{row['speedup']:.2f} | tau {row['tau']:.2f} | "
                  f"identical={same}")
    write_json(args.json_out, {"args": vars(args), "machine": platform.platform(), "rows": rows})


if __name__ == "__main__":
    main()
