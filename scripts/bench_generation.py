"""Static batches vs continuous batching (refilled slots), plain and speculative, on long-tailed output lengths.

The target is a random Qwen3 geometry made a greedy cycle (``dspark_jax.testing.make_cycle_target``: per-token
compute unchanged), so each request's output length is set exactly by its prompt's last token: lengths are drawn
log-normal and clipped to [--min-len, --max-len]. Both modes decode the same requests with the same number of rows
at once: "static" runs ``dj.generate`` on consecutive chunks of ``slots`` requests (what a batch job does without
refills: a chunk lasts as long as its longest request), "continuous" runs ``dj.generate(max_slots=slots)`` with the
default ``refill_at`` and with ``refill_at=1, shrink=True`` (the drain policy: the live rows packed into half the
slots each time half are free once the queue is empty).
Speculative rows use a DSpark draft whose Markov head holds the target's bigram table (``make_oracle_draft``: every
draft accepted, an upper bound on tau) with ``--draft oracle``, a random draft (tau ~ 1: the loop's cost) with
``--draft random``. Each configuration runs once to compile and once timed (static and the policies interleaved).
Reports tokens/s, slot utilisation (slot-steps that advanced a live request; a request's first token comes from its
prompt pass in both modes) and the ratio, and checks that both modes produce the same tokens.

    python scripts/bench_generation.py [--requests 256] [--slots 16,32] [--hidden 256 --layers 8 --vocab 1024]
                                       [--draft oracle|random|none] [--block-size 4]
"""

from __future__ import annotations

import time

import numpy as np
from _bench_common import add_options, machine, parser, write_json
from _bench_jax import device_kind, random_qwen3_config, spread_taps

import dspark_jax as dj
from dspark_jax.testing import make_cycle_target, make_oracle_draft


def lengths_lognormal(n: int, lo: int, hi: int, median: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), lo, hi).astype(int)


def _generate(target, draft, prompts, **kw):
    if draft is None:
        return dj.generate(target, prompts, **kw)
    return dj.speculative_generate(target, draft, prompts, **kw)


def run_static(target, draft, prompts, slots, kw):
    """Chunks of ``slots`` requests, each to its longest request. -> (token lists, seconds, slot utilisation)."""
    tokens, busy, slot_steps = [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), slots):
        out = _generate(target, draft, prompts[i:i + slots], **kw)
        tokens += out.token_lists()
        if draft is None:   # decode steps: every row holds its slot until the chunk's longest request ends
            busy += int((out.lengths - 1).sum())
            slot_steps += slots * (int(out.lengths.max()) - 1)
        else:               # rounds: a row is busy in the rounds before it finishes
            busy += int((out.accept_lengths > 0).sum())
            slot_steps += slots * out.accept_lengths.shape[1]
    return tokens, time.perf_counter() - t0, busy / slot_steps


def run_continuous(target, draft, prompts, slots, refill_at, shrink, kw):
    t0 = time.perf_counter()
    out = _generate(target, draft, prompts, max_slots=slots, refill_at=refill_at, shrink=shrink, **kw)
    return out.token_lists(), time.perf_counter() - t0, out.stats


def main(argv=None):
    ap = parser(__doc__)
    add_options(ap, requests=256, slots="16,32")
    ap.add_argument("--refill-at", type=int, default=None, help="default max(1, slots // 8)")
    add_options(ap, min_len=16, max_len=512)
    ap.add_argument("--median-len", type=float, default=64)
    ap.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of the output lengths")
    add_options(ap, prompt_len=32, hidden=256, layers=8, vocab=1024)
    ap.add_argument("--draft", default="oracle", choices=["oracle", "random", "none"],
                    help="speculative rows: an oracle DSpark draft, a random one, or none (plain only)")
    add_options(ap, block_size=4, json_out=None)
    args = ap.parse_args(argv)
    if args.vocab <= args.max_len:
        ap.error("--vocab must exceed --max-len (the cycle sets lengths up to vocab - 1)")
    h = args.hidden
    target = dj.build_target(random_qwen3_config(h, args.layers, args.vocab, eos_token_id=0), seed=0)
    rng = np.random.default_rng(1)
    order = rng.permutation(args.vocab)
    make_cycle_target(target, order)
    lengths = lengths_lognormal(args.requests, args.min_len, args.max_len, args.median_len, args.sigma, seed=2)
    prompts = [rng.integers(0, args.vocab, args.prompt_len - 1).tolist() + [int(order[-1 - n])] for n in lengths]
    kw = dict(max_new_tokens=args.max_len, temperature=0.0, stop_token_ids=[int(order[-1])])
    useful = int(lengths.sum())
    print(f"{args.requests} requests, output lengths {lengths.min()}-{lengths.max()} (median {np.median(lengths):.0f}, "
          f"mean {lengths.mean():.1f}, {useful} tokens); target H={h} x {args.layers} layers, V={args.vocab}; "
          f"{device_kind()}, {machine()}")
    loops = [("plain", None)]
    if args.draft != "none":
        dcfg = dj.DraftConfig(block_size=args.block_size, mask_token_id=args.vocab - 1,
                              target_layer_ids=spread_taps(args.layers, 0),
                              markov_rank=args.vocab, num_draft_layers=1)
        draft = dj.build_draft(target, dcfg, seed=3)
        if args.draft == "oracle":
            make_oracle_draft(target, draft, scale=50.0)       # greedy oracle: every draft is the target's token
        loops.append((f"speculative ({args.draft} draft, Bs={args.block_size})", draft))
    rows = []
    for name, draft in loops:
        for slots in (int(s) for s in args.slots.split(",")):
            # continuous policies: the default refill, and refill_at=1 with the drain policy (shrink)
            policies = [(args.refill_at or max(1, slots // 8), False), (1, True)]
            for refill, shrink in policies:                                                  # compile
                run_continuous(target, draft, prompts, slots, refill, shrink, kw)
            run_static(target, draft, prompts, slots, kw)
            # timed, interleaved: static, then each policy
            s_tokens, s_sec, s_util = run_static(target, draft, prompts, slots, kw)
            assert [len(t) for t in s_tokens] == lengths.tolist(), "static lengths differ from the design"
            row = {"loop": name, "slots": slots,
                   "static": {"seconds": s_sec, "tokens_per_s": useful / s_sec, "utilisation": s_util},
                   "continuous": []}
            for refill, shrink in policies:
                c_tokens, c_sec, c_stats = run_continuous(target, draft, prompts, slots, refill, shrink, kw)
                assert c_tokens == s_tokens, "continuous batching changed the tokens"
                c = {"refill_at": refill, "shrink": shrink, "seconds": c_sec, "tokens_per_s": useful / c_sec,
                     "utilisation": c_stats["slot_utilisation"], "prompt_passes": c_stats["prompt_passes"],
                     "syncs": c_stats["syncs"], "speedup": s_sec / c_sec}
                if draft is not None:
                    c["tau"] = c_stats["tau"]
                row["continuous"].append(c)
                tau = f", tau {c['tau']:.2f}" if draft is not None else ""
                print(f"{name}, {slots} slots{tau}: static {row['static']['tokens_per_s']:.0f} tok/s, utilisation "
                      f"{s_util:.1%} | continuous (refill at {refill}{', shrink' if shrink else ''}) "
                      f"{c['tokens_per_s']:.0f} tok/s, utilisation {c['utilisation']:.1%}, {c['prompt_passes']} "
                      f"prompt passes | {c['speedup']:.2f}x", flush=True)
            rows.append(row)
    write_json(args.json_out, {"args": vars(args), "lengths": lengths.tolist(), "rows": rows})


if __name__ == "__main__":
    main()
