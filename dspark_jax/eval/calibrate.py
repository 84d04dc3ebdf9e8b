"""``dspark calibrate``: record full-block rounds on held-out prompt sets, fit STS temperatures for the draft's
confidence head (decode/calibrate.py), write the report and the temperatures beside the draft."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from dspark_jax.convert.deepspec import load_draft
from dspark_jax.convert.hf import load_target
from dspark_jax.decode.calibrate import (
    fit_from_rounds,
    format_report,
    record_rounds,
    reliability_diagram,
    rounds_to_samples,
)
from dspark_jax.decode.synthetic import resolve_stop_ids
from dspark_jax.drafts.temperatures import save_temperatures
from dspark_jax.eval import datasets as D


def cmd_calibrate(args) -> int:
    """Fits STS temperatures for a draft's confidence head on held-out prompts; saves them beside the draft."""
    try:
        names = D.resolve_names(args.data, args.datasets)
    except D.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if not names:
        raise SystemExit(f"error: no dataset in {args.data!r}; pass --datasets")
    target = load_target(args.target, dtype=args.dtype)
    tok = getattr(target, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        raise SystemExit(f"error: the target directory {args.target!r} has no tokenizer with a chat template")
    draft = load_draft(args.draft, dtype=args.draft_dtype)
    if not draft.config.has_confidence:
        raise SystemExit("error: this draft has no confidence head; there is nothing to calibrate")
    prompts: list[list[int]] = []
    for name in names:
        texts = D.load_prompts(args.data, name, args.max_samples, args.seed)
        prompts += [D.chat_prompt_ids(tok, t) for t in texts]
    if not prompts:
        raise SystemExit("error: the selected datasets hold no prompts")
    print(f"[calibrate] {len(prompts)} prompts from {', '.join(names)}; full-block decoding at temperature "
          f"{args.temperature}, {args.max_new_tokens} new tokens")
    t0 = time.perf_counter()
    rounds = record_rounds(target, draft, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                           stop_token_ids=resolve_stop_ids(target, args.target), progress=not args.no_progress)
    res = fit_from_rounds(rounds, holdout=args.holdout, seed=args.seed)
    if jax.process_index() != 0:  # several processes run the same (small) job; one writes
        return 0
    report_dir = args.report_dir or os.path.join(args.draft, "calibration")
    os.makedirs(report_dir, exist_ok=True)
    np.savez_compressed(os.path.join(report_dir, "rounds.npz"), **rounds)
    z, lab, val = rounds_to_samples(rounds)
    png = reliability_diagram(z, lab, val, res.temperatures, os.path.join(report_dir, "reliability.png"))
    summary = {"draft": os.path.abspath(args.draft), "target": os.path.abspath(args.target), "datasets": names,
               "prompts": len(prompts), "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "holdout": args.holdout, "fit_rounds": res.fit_rounds, "eval_rounds": res.eval_rounds,
               "temperatures": list(res.temperatures), "positions": res.report,
               "backend": jax.default_backend(), "seconds": time.perf_counter() - t0}
    with open(os.path.join(report_dir, "calibration.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(format_report(res.report))
    if args.no_save:
        print("[calibrate] --no-save: temperatures not written")
    else:
        dest = save_temperatures(args.save_to or args.draft, res.temperatures,
                                 {"fit_rounds": res.fit_rounds, "datasets": names})
        print(f"[calibrate] wrote {dest} (dj.load_draft applies it)")
    print(f"[calibrate] report: {os.path.join(report_dir, 'calibration.json')}" + (f", {png}" if png else ""))
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit STS temperatures for the draft's confidence head",
                       description=cmd_calibrate.__doc__)
    p.add_argument("--target", required=True, help="HF target directory (with tokenizer and chat template)")
    p.add_argument("--draft", required=True, help="DSpark draft directory (with a confidence head)")
    p.add_argument("--data", required=True, help="directory of DeepSpec-format <dataset>.jsonl prompt files "
                                                 "(held out from training)")
    p.add_argument("--datasets", default=None, help="comma-separated names (default: DeepSpec's list, those present)")
    p.add_argument("--max-samples", type=int, default=32, help="prompts per dataset (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, the paper's)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8,
                   help="slots: prompts decoding at once, a finished one's slot taking the next (default 8)")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="share of prompts held out to report ECE/AUC after fitting (default 0.5)")
    p.add_argument("--seed", type=int, default=980406)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="target dtype")
    p.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--save-to", default=None, help="where sts_temperatures.json goes (default: the draft directory)")
    p.add_argument("--report-dir", default=None,
                   help="calibration.json, rounds.npz, reliability.png (default <draft>/calibration)")
    p.add_argument("--no-save", action="store_true", help="report only; do not write the temperatures")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_calibrate)


__all__ = ["cmd_calibrate", "add_calibrate_parser"]
