"""Confidence scheduling end to end (issue 32): tokens/s of plain decoding, full blocks, a 0.5 threshold, the prefix
scheduler (Algorithm 1) and ZOS in the real decode loop, per batch size, with the schedulers priced by a round
profile of the same engine (``dspark profile --draft``: whole rounds + the plain step, measured first in this run).

    python scripts/bench_scheduling.py --pair demo --demo-dir demo_out      # target + DSpark draft of `dspark demo`
    python scripts/bench_scheduling.py --pair oracle                        # deeper random target, oracle draft

``oracle``: a random Qwen3 target made a greedy cycle (``make_cycle_target``: compute unchanged) and a DSpark draft
whose Markov head holds the target's bigram table (``make_oracle_draft``, greedy: every draft is accepted) and whose
confidence head says ``sigmoid(--oracle-confidence-logit)`` everywhere. Greedy decoding; every speculative row's
tokens are checked against plain decoding's. Per batch: the profile, one compile run per row, then ``--repeats``
interleaved timed runs. Each run decodes all ``--prompts`` prompts in consecutive batches (as ``dspark eval`` does).
Timed runs go call by call: each batch of prompts is decoded by every row in turn, the order rotating with every
call (when runs x calls is a multiple of the 5 rows, e.g. the default ``--repeats 5``, each row holds each place in
the order equally often), so load bursts hit all rows alike. tokens/s = the new tokens of one run / the sum over its
calls of each call's typical seconds (the mean of the faster half of its ``--repeats`` timings, as the round profile
takes them: on a shared machine noise only adds time); the median over runs of a run's tokens/s is reported beside
it, and the per-run ratios (rows of a run ran side by side). τ, drafts per row-round and the share of plain
row-rounds, and the share of calls that ran the speculative loop (``loop calls``; a scheduler's other calls run
plain decoding whole) are those of the timed calls (a scheduler's carried switch state decides anew in every
call; the untimed check pass's are kept in the JSON as ``check_pass``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from _bench_common import add_options, machine, parser, write_json  # noqa: E402
from _bench_jax import device_kind, random_qwen3_config, spread_taps  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.decode.profile import profile_rounds  # noqa: E402
from dspark_jax.decode.prompts import pad_batch  # noqa: E402
from dspark_jax.decode.scheduler import PrefixScheduler, ZeroOverheadScheduler, typical_seconds  # noqa: E402


def demo_pair(demo_dir: str, n: int):
    from dspark_jax.eval.datasets import chat_prompt_ids, load_prompts

    target = dj.load_target(os.path.join(demo_dir, "target"))
    draft = dj.load_draft(os.path.join(demo_dir, "drafts", "dspark", "draft"), target=target)
    texts = load_prompts(os.path.join(demo_dir, "eval_data"), "heldout", max_samples=1000)
    # held-out prompts of <= 64 tokens: few prompt buckets, so each loop compiles once or twice per batch size
    prompts = [p for p in (chat_prompt_ids(target.tokenizer, t) for t in texts) if len(p) <= 64]
    prompts = (prompts * (n // len(prompts) + 1))[:n]        # repeated to fill the largest batch
    return target, draft, prompts, None   # stop at the target's eos


def oracle_pair(n: int, hidden: int, layers: int, vocab: int, block: int, conf_logit: float, prompt_len: int):
    from dspark_jax.testing import make_cycle_target, make_oracle_draft

    target = dj.build_target(random_qwen3_config(hidden, layers, vocab, eos_token_id=0), seed=0)
    rng = np.random.default_rng(1)
    make_cycle_target(target, rng.permutation(vocab))
    dcfg = dj.DraftConfig(block_size=block, mask_token_id=vocab - 1,
                          target_layer_ids=spread_taps(layers, 0),
                          markov_rank=vocab, num_draft_layers=1, enable_confidence_head=True)
    draft = dj.build_draft(target, dcfg, seed=3)
    make_oracle_draft(target, draft, scale=50.0)
    proj = draft.confidence_head.proj
    proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
    proj.bias[...] = jnp.full_like(proj.bias[...], conf_logit)
    prompts = [rng.integers(1, vocab - 1, prompt_len).tolist() for _ in range(n)]
    return target, draft, prompts, ()


def _chunks(prompts, batch):
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


def _compiled_programs() -> int:
    """How many programs the decode loops' jits hold (a rise during timed runs = compile time in the figures)."""
    from dspark_jax.decode.autoregressive import _generate_jit
    from dspark_jax.decode.speculative import _spec_jit

    return _generate_jit._cache_size() + _spec_jit._cache_size()


def _decisions(outs) -> dict:
    """τ, drafts verified per row-round and the share of plain row-rounds over ``outs``; the share of calls that ran
    the speculative loop (the others: dj.generate, or a scheduler's whole-plain call); their new tokens."""
    row_rounds = sum(o.stats.get("row_rounds", 0) for o in outs)

    def per_row_round(key, default):
        if not row_rounds:
            return default
        return sum(o.stats.get(key, default) * o.stats.get("row_rounds", 0) for o in outs) / row_rounds

    return {"tau": per_row_round("tau", 1.0), "drafts_per_row_round": per_row_round("mean_proposal", 0.0),
            "plain_share": sum(o.stats.get("plain_rounds", 0) for o in outs) / row_rounds if row_rounds else 1.0,
            "loop_call_share": sum(o.stats.get("plain_rounds", 0) < o.stats.get("row_rounds", 0) for o in outs)
            / max(len(outs), 1),
            "new_tokens": sum(float(o.lengths.sum()) for o in outs)}


def run_batch(target, draft, prompts, batch, stops, max_new, repeats, context, log):
    """All ``prompts`` decoded in consecutive batches of ``batch`` (as ``dspark eval`` does): tokens/s over them."""
    t0 = time.perf_counter()
    width = max(pad_batch(c)[0].shape[1] for c in _chunks(prompts, batch))     # the calls' padded prompt width
    prof = profile_rounds(target, draft, batch, context=context, repeats=7, rounds=16, prompt_width=width,
                          max_new_tokens=max_new)
    log(f"  batch {batch}: profile {time.perf_counter() - t0:.0f} s: plan {prof['verify_buckets']}, plain "
        f"{1e3 * prof['plain_seconds']:.2f} ms (loop's plain run {1e3 * prof['plain_run_seconds']:.2f}), rounds "
        + ", ".join(f"{m['branch'][0]}{m['tokens']}={1e3 * m['seconds']:.2f}" for m in prof["measured"]))
    sps, plain_sps, plan = prof["sps_table"], prof["plain_sps"], tuple(prof["verify_buckets"])
    kw = dict(max_new_tokens=max_new, stop_token_ids=stops)
    prefix = PrefixScheduler(sps, plain_sps=plain_sps, verify_buckets=plan)
    zos = ZeroOverheadScheduler(sps, plain_sps=plain_sps, verify_buckets=plan)
    rows = {
        "plain": lambda p: dj.generate(target, p, **kw),
        "full blocks": lambda p: dj.speculative_generate(target, draft, p, **kw),
        "threshold 0.5": lambda p: dj.speculative_generate(target, draft, p, threshold=0.5, ragged_verify=plan, **kw),
        "prefix": lambda p: dj.speculative_generate(target, draft, p, scheduler=prefix, **kw),
        "ZOS": lambda p: dj.speculative_generate(target, draft, p, scheduler=zos, **kw),
    }
    chunks = _chunks(prompts, batch)

    def run_all(fn):
        outs = [fn(p) for p in chunks]
        secs = sum(o.stats["seconds"] for o in outs)
        return outs, float(sum(o.lengths.sum() for o in outs)) / secs

    ref = [o.tokens for o in run_all(rows["plain"])[0]]
    # a scheduler call runs the loop or, once its carried switch state says all plain, dj.generate's loop: compile
    # the speculative loop for every chunk's prompt width (a fresh switch state each call) before the steady-state
    # pass below, so that no timed probe call pays a compile
    for sched in (prefix, zos):
        for p in chunks:
            sched.forget_switch_state()
            dj.speculative_generate(target, draft, p, scheduler=sched, **kw)
        sched.forget_switch_state()
    info, check_pass = {}, {}
    for name, fn in rows.items():                     # compile, and check the tokens against plain decoding
        outs, _ = run_all(fn)
        assert all(np.array_equal(o.tokens, r) for o, r in zip(outs, ref)), f"{name}: tokens differ from plain"
        check_pass[name] = _decisions(outs)
    timed_outs = {name: [] for name in rows}      # the timed calls' outputs: what the schedulers decided while timed
    speeds = {name: [] for name in rows}
    call_secs = {name: [[] for _ in chunks] for name in rows}      # [row][chunk] -> seconds of each repeat
    compiled = _compiled_programs()
    names = list(rows)
    for i in range(repeats):
        # call by call: every chunk is decoded by each row in turn (the order rotating with every call), so that a
        # burst of load on a shared machine lands on all rows alike instead of on whichever row's block of calls it hits
        secs, toks = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for j, p in enumerate(chunks):
            k = (i * len(chunks) + j) % len(names)
            for name in names[k:] + names[:k]:
                out = rows[name](p)
                timed_outs[name].append(out)
                secs[name] += out.stats["seconds"]
                toks[name] += float(out.lengths.sum())
                call_secs[name][j].append(out.stats["seconds"])
        for name in names:
            speeds[name].append(toks[name] / secs[name])
    compiled = _compiled_programs() - compiled
    if compiled:
        log(f"  warning: {compiled} program(s) compiled during the timed runs: their compile time is in the figures")
    result = {"batch": batch, "profile": {k: prof[k] for k in ("measured", "plain_seconds", "plain_run_seconds",
                                                                    "verify_buckets")},
              "rows": {}, "compiled_while_timed": compiled}
    for name in rows:
        # tau, drafts per row-round and the plain share of the timed calls (a carried switch state decides anew in
        # every call, so the check pass's decisions need not be the timed runs'); new tokens: one run's
        info[name] = dict(_decisions(timed_outs[name]), new_tokens=check_pass[name]["new_tokens"],
                          check_pass=check_pass[name])
        typical = sum(typical_seconds(t) for t in call_secs[name])
        result["rows"][name] = dict(info[name], tokens_per_s=info[name]["new_tokens"] / typical,
                                    median_tokens_per_s=statistics.median(speeds[name]), all=speeds[name])
    return result


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--pair", choices=["demo", "oracle"], required=True)
    add_options(ap, demo_dir="demo_out", batches="1,4,8,16,32")
    ap.add_argument("--prompts", type=int, default=64, help="prompts decoded per batch size (in batches)")
    add_options(ap, max_new_tokens=96, repeats=5, hidden=256, layers=8, vocab=1024, block_size=4,
                oracle_confidence_logit=3.0, prompt_len=64, json_out=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    n = args.prompts
    if args.pair == "demo":
        target, draft, prompts, stops = demo_pair(args.demo_dir, n)
    else:
        target, draft, prompts, stops = oracle_pair(n, args.hidden, args.layers, args.vocab, args.block_size,
                                                    args.oracle_confidence_logit, args.prompt_len)
    context = int(np.median([len(p) for p in prompts])) + args.max_new_tokens // 2
    print(f"{args.pair} pair: target H={target.config.hidden_size} x {target.config.num_hidden_layers} layers, "
          f"V={target.config.vocab_size}; Bs={draft.config.block_size}; {len(prompts)} prompts; profile context "
          f"{context}; {device_kind()}, {machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    results = []
    print("| batch | row | tokens/s | x plain | tau | drafts / row-round | plain rounds | loop calls |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        res = run_batch(target, draft, prompts, b, stops, args.max_new_tokens, args.repeats, context,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
        results.append(res)
        base = res["rows"]["plain"]["tokens_per_s"]
        for name, r in res["rows"].items():
            print(f"| {b} | {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | {r['tau']:.2f} | "
                  f"{r['drafts_per_row_round']:.2f} | {r['plain_share']:.0%} | {r['loop_call_share']:.0%} |",
                  flush=True)
        best = max(base, res["rows"]["full blocks"]["tokens_per_s"])
        res["prefix_vs_best_baseline"] = res["rows"]["prefix"]["tokens_per_s"] / best
        res["zos_vs_best_baseline"] = res["rows"]["ZOS"]["tokens_per_s"] / best
        best_med = max(res["rows"]["plain"]["median_tokens_per_s"], res["rows"]["full blocks"]["median_tokens_per_s"])
        res["prefix_vs_best_medians"] = res["rows"]["prefix"]["median_tokens_per_s"] / best_med
        # the same ratio within each repeat (its rows ran back to back, under the same load), then the median
        rows_all = {k: np.asarray(v["all"]) for k, v in res["rows"].items()}
        best_all = np.maximum(rows_all["plain"], rows_all["full blocks"])
        res["prefix_vs_best_paired"] = float(np.median(rows_all["prefix"] / best_all))
        res["zos_vs_best_paired"] = float(np.median(rows_all["ZOS"] / best_all))
        print(f"|  | prefix / max(plain, full) = {res['prefix_vs_best_baseline']:.3f}, ZOS: "
              f"{res['zos_vs_best_baseline']:.3f}; prefix, of median runs {res['prefix_vs_best_medians']:.3f}, "
              f"median of per-run ratios {res['prefix_vs_best_paired']:.3f}, "
              f"ZOS {res['zos_vs_best_paired']:.3f} | | | | | | |", flush=True)
    write_json(args.json_out, {"pair": args.pair, "args": vars(args), "results": results}, indent=1)


if __name__ == "__main__":
    main()
