"""``dspark eval``: acceptance metrics (spec §4.7) and speculative-vs-plain throughput on DeepSpec prompt sets.

Per dataset, prompts (spec §4.8) are run through a speculative slot engine (``dj.speculative_generate``'s loop,
continuous batching over ``batch_size`` slots: a finished prompt's slot takes the next one, the threshold or
scheduler sees the live slots as its batch) and, on the same prompts with the same seed, request ids and
sampling settings, through a plain one (``dj.generate``'s); both are timed. JAX's compile time during each run
is measured and subtracted (``warmup``, default) so tokens/s exclude compilation, which is reported
separately. Rounds are aggregated as sums over all rounds of the dataset (:mod:`dspark_jax.decode.metrics`),
never as means of batch means.

Writes ``results.json`` (settings, per-dataset metrics and raw counts), ``results.md`` (Markdown tables) and
``rounds/<dataset>.npz`` (per-sample round arrays: accept_lengths, proposal_lengths, accepted_drafts and the
per-position confidence, for re-aggregation or calibration studies).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from dspark_jax import distributed
from dspark_jax.convert.deepspec import load_draft
from dspark_jax.convert.hf import load_target
from dspark_jax.decode.autoregressive import slot_engine
from dspark_jax.decode.compile_timer import CompileTimer
from dspark_jax.decode.metrics import (
    RoundCounts,
    accepted_drafts_from_outcome,
    round_counts,
    summarize,
)
from dspark_jax.decode.scheduler import PrefixScheduler, ZeroOverheadScheduler
from dspark_jax.decode.speculative import spec_slot_engine
from dspark_jax.decode.synthetic import resolve_stop_ids
from dspark_jax.eval import datasets as D


@dataclasses.dataclass
class EvalSettings:
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    threshold: float = 0.0
    seed: int = 980406
    batch_size: int = 1
    max_samples: int | None = None
    warmup: bool = True
    scheduler: Any = None  # a PrefixScheduler / ZeroOverheadScheduler (dspark_jax.decode.scheduler) or None


def drafts_per_round(draft) -> int:
    return draft.config.drafts_per_round


@dataclasses.dataclass
class _DatasetRun:
    counts: RoundCounts
    spec_tokens: int = 0
    spec_seconds: float = 0.0
    plain_tokens: int = 0
    plain_seconds: float = 0.0
    compile_seconds: float = 0.0
    greedy_rows: int = 0
    greedy_match: int = 0
    prompt_tokens: int = 0
    rounds: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    batch_ids: list[int] = dataclasses.field(default_factory=list)  # which sample each rounds entry came from


def _run_engine(engine, prompts: list[list[int]], indices: list[int], warmup: bool, on_done):
    """Every prompt ``indices[i]`` through ``engine`` (request id = its index in the dataset). Returns ({index:
    result}, seconds, compile seconds); with ``warmup`` the seconds exclude compilation."""
    for i in indices:
        engine.submit(i, prompts[i], tag=i)
    results = {}
    t0 = time.perf_counter()
    with CompileTimer() as timer:
        for i, res in engine.run():
            results[i] = res
            if on_done is not None:
                on_done(1)
    seconds = time.perf_counter() - t0
    return results, (seconds - timer.seconds if warmup else seconds), timer.seconds


def evaluate_dataset(target, draft, name: str, prompts: list[list[int]], settings: EvalSettings,
                     stop_ids: tuple[int, ...], on_done: Callable[[int], None] | None = None,
                     process_index: int = 0, process_count: int = 1) -> _DatasetRun:
    """Runs one dataset's prompts (token ids) speculatively and plainly, each through a slot engine of
    ``batch_size`` slots (continuous batching: a finished prompt's slot takes the next one; the threshold or
    scheduler sees the live slots as its batch); returns the accumulated run. Prompt ``i`` samples with request
    id ``i`` and the seed in both modes, so its tokens do not depend on the batching. On several processes this
    one runs prompts ``process_index::process_count`` (its rounds are keyed by sample index, for
    :func:`merge_runs`). ``on_done(n)`` counts finished generations (speculative and plain)."""
    k = drafts_per_round(draft)
    run = _DatasetRun(counts=RoundCounts(k))
    mine = list(range(len(prompts)))[process_index::process_count]
    if not mine:
        return run
    # the dataset's longest prompt sizes the caches on every process: same shapes whatever the process count
    kw = dict(num_slots=max(1, min(settings.batch_size, len(mine))), max_prompt_len=max(len(p) for p in prompts),
              max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
              top_p=settings.top_p, stop_token_ids=stop_ids, seed=settings.seed)
    spec, run.spec_seconds, c_spec = _run_engine(
        spec_slot_engine(target, draft, threshold=settings.threshold, scheduler=settings.scheduler, **kw),
        prompts, mine, settings.warmup, on_done)
    plain, run.plain_seconds, c_plain = _run_engine(slot_engine(target, **kw), prompts, mine, settings.warmup,
                                                    on_done)
    run.compile_seconds = c_spec + c_plain
    for i in mine:
        s, p = spec[i], plain[i]
        run.counts = run.counts + round_counts(s.accept[None], s.proposed[None],
                                               accepted_drafts_from_outcome(s.outcome[None]), max_positions=k,
                                               samples=1)
        run.spec_tokens += len(s.tokens)
        run.plain_tokens += len(p)
        run.prompt_tokens += len(prompts[i])
        if settings.temperature == 0:
            run.greedy_rows += 1
            run.greedy_match += s.tokens.tolist() == p.tolist()
        _keep_rounds(run, s, i)
    return run


def _keep_rounds(run: _DatasetRun, res, i: int) -> None:
    """Sample ``i``'s round arrays (``[1, rounds, ...]``), keyed by its index."""
    arrays = {"sample_index": np.asarray([i], np.int64), "accept_lengths": res.accept[None],
              "proposal_lengths": res.proposed[None], "new_tokens": np.asarray([len(res.tokens)]),
              "accepted_drafts": accepted_drafts_from_outcome(res.outcome[None]), "confidence": res.conf[None]}
    for key, val in arrays.items():
        run.rounds.setdefault(key, []).append(val)
    run.batch_ids.append(i)


def _stack_rounds(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates per-batch ``[b, rounds, ...]`` arrays along rows, zero-padding the rounds axis."""
    out = {}
    for key, vals in parts.items():
        if vals[0].ndim == 1:
            out[key] = np.concatenate(vals)
            continue
        width = max(v.shape[1] for v in vals)
        padded = [np.pad(v, [(0, 0), (0, width - v.shape[1])] + [(0, 0)] * (v.ndim - 2)) for v in vals]
        out[key] = np.concatenate(padded)
    return out


_RUN_SUMS = ("spec_tokens", "spec_seconds", "plain_tokens", "plain_seconds", "compile_seconds", "greedy_rows",
             "greedy_match", "prompt_tokens")


def _write_part(run: _DatasetRun, prefix: str) -> None:
    """One process's share of a dataset: sums + counts as JSON, round arrays keyed ``<array>/<sample index>``."""
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump({"counts": run.counts.to_dict(), "batch_ids": run.batch_ids,
                   **{k: getattr(run, k) for k in _RUN_SUMS}}, f)
    np.savez(prefix + ".npz", **{f"{key}/{j}": a for key, vals in run.rounds.items()
                                 for j, a in zip(run.batch_ids, vals)})


def merge_runs(prefixes: list[str], max_positions: int) -> _DatasetRun:
    """The run of all processes from their parts: counts, tokens and seconds summed (so tokens/s is per
    process), round arrays in sample order -- what one process running every prompt would hold."""
    run = _DatasetRun(counts=RoundCounts(max_positions))
    by_batch: dict[int, dict[str, np.ndarray]] = {}
    for prefix in prefixes:
        with open(prefix + ".json", encoding="utf-8") as f:
            part = json.load(f)
        run.counts = run.counts + RoundCounts.from_dict(part["counts"])
        for k in _RUN_SUMS:
            setattr(run, k, getattr(run, k) + part[k])
        with np.load(prefix + ".npz") as z:
            for name in z.files:
                key, j = name.rsplit("/", 1)
                by_batch.setdefault(int(j), {})[key] = z[name]
    for j in sorted(by_batch):
        for key, a in by_batch[j].items():
            run.rounds.setdefault(key, []).append(a)
        run.batch_ids.append(j)
    return run


def _gather_run(run: _DatasetRun, name: str, parts_dir: str, process_index: int, process_count: int,
                max_positions: int) -> _DatasetRun | None:
    """Every process writes its part; process 0 returns the merged run (the others None)."""
    os.makedirs(parts_dir, exist_ok=True)
    prefixes = [os.path.join(parts_dir, f"{name}.part-{p:05d}-of-{process_count:05d}") for p in range(process_count)]
    _write_part(run, prefixes[process_index])
    distributed.barrier(f"dspark_jax.eval.{name}.parts_written")
    merged = None
    if process_index == 0:
        merged = merge_runs(prefixes, max_positions)
        for prefix in prefixes:
            os.remove(prefix + ".json")
            os.remove(prefix + ".npz")
    return merged


def dataset_row(name: str, run: _DatasetRun) -> dict[str, Any]:
    row = {"dataset": name, **summarize(run.counts)}
    spec_tps = run.spec_tokens / run.spec_seconds if run.spec_seconds > 0 else 0.0
    plain_tps = run.plain_tokens / run.plain_seconds if run.plain_seconds > 0 else 0.0
    row.update({
        "prompt_tokens": run.prompt_tokens,
        "speculative": {"new_tokens": run.spec_tokens, "seconds": run.spec_seconds, "tokens_per_s": spec_tps},
        "plain": {"new_tokens": run.plain_tokens, "seconds": run.plain_seconds, "tokens_per_s": plain_tps},
        "speedup": spec_tps / plain_tps if plain_tps > 0 else None,
        "compile_seconds": run.compile_seconds,
        "counts": run.counts.to_dict(),
    })
    if run.greedy_rows:
        row["greedy_match_rate"] = run.greedy_match / run.greedy_rows
    return row


def evaluate(target, draft, data_dir: str | os.PathLike, datasets: str | list[str] | None,
             settings: EvalSettings, *, target_dir: str | os.PathLike | None = None, rounds_dir: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print, process_index: int = 0,
             process_count: int = 1) -> dict[str, Any]:
    """Evaluates ``draft`` against ``target`` on the named datasets of ``data_dir``. Returns the results dict
    (what ``results.json`` holds); with ``rounds_dir`` also writes ``<dataset>.npz`` round arrays there.

    With ``process_count > 1`` (every process of a ``jax.distributed`` run calls this with its index) each
    process runs every ``process_count``-th prompt of each dataset, writes its part to ``rounds_dir`` (required
    then, on a file system all processes share), and process 0 merges the parts: its results are the run's
    (tokens/s per process), the others' have no dataset rows."""
    tok = getattr(target, "tokenizer", None)
    if tok is None:
        raise ValueError("the target has no tokenizer: eval renders prompts with the chat template; put the "
                         "tokenizer files (tokenizer.json, tokenizer_config.json) in the target directory")
    if not getattr(tok, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template")
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if process_count > 1 and rounds_dir is None:
        raise ValueError("eval on several processes needs rounds_dir (where the processes' parts meet)")
    names = D.resolve_names(data_dir, datasets)
    if not names:
        raise D.DatasetError(f"none of DeepSpec's default datasets is in {os.fspath(data_dir)!r}; pass --datasets "
                             f"(available: {', '.join(D.available_datasets(data_dir))})")
    stop_ids = resolve_stop_ids(target, target_dir)
    loaded = {}
    for name in names:
        texts = D.load_prompts(data_dir, name, settings.max_samples, settings.seed)
        loaded[name] = [D.chat_prompt_ids(tok, t) for t in texts]
        limit = target.config.max_position_embeddings
        longest = max((len(p) for p in loaded[name]), default=0)
        if longest + settings.max_new_tokens > limit:
            log(f"[eval] warning: {name}: a prompt of {longest} tokens + {settings.max_new_tokens} new tokens exceeds "
                f"max_position_embeddings={limit}")
    total = sum(len(p) for p in loaded.values())
    bar = None
    if progress and total:
        # each prompt runs twice, speculative then plain
        bar = tqdm(total=2 * total, desc="eval", unit="generation", file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for name in names:
        prompts = loaded[name]
        if not prompts:
            log(f"[eval] {name}: no prompts (empty file); skipped")
            continue
        if bar is not None:
            bar.set_postfix(dataset=name)
        run = evaluate_dataset(target, draft, name, prompts, settings, stop_ids,
                               on_done=bar.update if bar is not None else None, process_index=process_index,
                               process_count=process_count)
        if process_count > 1:
            run = _gather_run(run, name, rounds_dir, process_index, process_count, drafts_per_round(draft))
            if run is None:  # not process 0: its share is in the merged run
                continue
        row = dataset_row(name, run)
        rows.append(row)
        if rounds_dir is not None:
            os.makedirs(rounds_dir, exist_ok=True)
            np.savez_compressed(os.path.join(rounds_dir, f"{name}.npz"), **_stack_rounds(run.rounds))
        log(f"[eval] {name}: n={row['samples']} tau={row['tau']:.2f} #propose={row['propose']} "
            f"verify_rate={row['verify_rate']:.4f} spec {row['speculative']['tokens_per_s']:.1f} tok/s vs plain "
            f"{row['plain']['tokens_per_s']:.1f} tok/s (x{row['speedup'] or 0:.2f})")
    if bar is not None:
        bar.close()
    return {
        "settings": {**dataclasses.asdict(settings), "stop_token_ids": list(stop_ids),
                     "drafts_per_round": drafts_per_round(draft), "datasets": names},
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "wall_seconds": time.perf_counter() - t0,
        "datasets": rows,
    }


# ---- reports ------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown_report(results: dict[str, Any]) -> str:
    rows = results["datasets"]
    s = results["settings"]
    k = s["drafts_per_round"]
    title = "# DSpark eval"
    if results.get("draft") and results.get("target"):
        title += f": draft {os.path.basename(results['draft'].rstrip('/'))} on target " \
                 f"{os.path.basename(results['target'].rstrip('/'))}"
    lines = [title, "",
             f"temperature {s['temperature']}, max_new_tokens {s['max_new_tokens']}, threshold {s['threshold']}, "
             f"batch {s['batch_size']}, seed {s['seed']}, backend {results['backend']} ({results['device']}). "
             "tau includes the bonus token; tokens/s exclude compilation.", "",
             "| dataset | n | #propose | tau | verify_rate | spec tok/s | plain tok/s | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['samples']} | {r['propose']} | {r['tau']:.2f} | {r['verify_rate']:.4f} | "
                     f"{r['speculative']['tokens_per_s']:.1f} | {r['plain']['tokens_per_s']:.1f} | "
                     f"{_f(r['speedup'], '{:.2f}')} |")
    head = " | ".join(f"@{i}" for i in range(k))
    lines += ["", "accept_rate@k (rounds with m > k / rounds with L > k)", "",
              f"| dataset | {head} |", "|---|" + "---:|" * k]
    for r in rows:
        lines.append(f"| {r['dataset']} | " + " | ".join(_f(x) for x in r["accept_rate"]) + " |")
    lines += ["", "conditional acceptance accept_rate@k / accept_rate@(k-1)", "",
              f"| dataset | {head} |", "|---|" + "---:|" * k]
    for r in rows:
        lines.append(f"| {r['dataset']} | " + " | ".join(_f(x) for x in r["conditional_accept_rate"]) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: str | os.PathLike) -> tuple[str, str]:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    tmp = jpath + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, jpath)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(markdown_report(results))
    return jpath, mpath


# ---- command line -------------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    """Acceptance length, per-position acceptance and speculative vs plain tokens/s on DeepSpec prompt sets."""

    try:
        names = D.resolve_names(args.data_dir, args.datasets)
    except D.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if args.datasets is None:
        missing = [n for n, _ in D.DEFAULT_TASKS if n not in names]
        if missing:
            print(f"[eval] default datasets not in {args.data_dir}: {', '.join(missing)} (skipped)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --out {args.out!r}: {e.strerror or e}") from None
    target = load_target(args.target, dtype=args.dtype)
    if getattr(target, "tokenizer", None) is None:
        raise SystemExit(f"error: the target directory {args.target!r} has no tokenizer; eval applies its chat "
                         "template to the prompts (copy tokenizer.json / tokenizer_config.json there)")
    draft = load_draft(args.draft, dtype=args.draft_dtype)
    scheduler = None
    if args.sps is not None:
        # a round profile (`dspark profile --draft`) brings the plain step (switch-off) and the verify plan too
        cls = ZeroOverheadScheduler if args.scheduler == "zos" else PrefixScheduler
        try:
            scheduler = cls.from_profile(args.sps)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --sps {args.sps!r}: {e}") from None
    settings = EvalSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                            max_samples=args.max_samples, warmup=not args.no_warmup, scheduler=scheduler)

    try:
        results = evaluate(target, draft, args.data_dir, names, settings, target_dir=args.target,
                           rounds_dir=os.path.join(args.out, "rounds"), progress=not args.no_progress,
                           process_index=jax.process_index(), process_count=jax.process_count())
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() != 0:
        return 0
    results = {"target": os.path.abspath(args.target), "draft": os.path.abspath(args.draft), **results}
    jpath, mpath = write_results(results, args.out)
    print(markdown_report(results))
    print(f"[eval] wrote {jpath} and {mpath}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="acceptance metrics and speculative vs plain tokens/s on prompt sets",
                       description=cmd_eval.__doc__)
    p.add_argument("--target", required=True, help="HF target directory (with tokenizer and chat template)")
    p.add_argument("--draft", required=True, help="DeepSpec draft directory (DSpark / DFlash / Eagle3)")
    p.add_argument("--data-dir", required=True, help="directory of DeepSpec-format <dataset>.jsonl prompt files")
    p.add_argument("--datasets", default=None,
                   help="comma-separated names (default: DeepSpec's task list, those present in --data-dir)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="cap per dataset (default: the spec §4.8 caps, e.g. gsm8k 500, aime25 30)")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (the paper's setting)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--batch-size", type=int, default=1,
                   help="slots: prompts decoding at once, a finished one's slot taking the next (default 1, as "
                        "DeepSpec)")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--threshold", type=float, default=0.0, help="confidence threshold theta (0 = full blocks)")
    p.add_argument("--sps", default=None, help="schedule proposal lengths with this SPS profile (`dspark profile` "
                   "JSON): the hardware-aware prefix scheduler; needs a draft with a confidence head")
    p.add_argument("--scheduler", default="prefix", choices=["prefix", "zos"],
                   help="with --sps: Algorithm 1 (prefix, default) or its zero-overhead variant (zos)")
    p.add_argument("--seed", type=int, default=980406)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="target dtype")
    p.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16"],
                   help="draft dtype (default: the checkpoint's)")
    p.add_argument("--out", default="eval_results", help="results directory (default ./eval_results)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not subtract the compile time from the timings (tokens/s then include compilation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


__all__ = ["EvalSettings", "evaluate", "evaluate_dataset", "dataset_row", "markdown_report", "write_results",
           "cmd_eval", "add_eval_parser", "drafts_per_round"]
