"""The demo's report: results.json, a markdown τ / speed table, and (with matplotlib) acceptance by position."""

from __future__ import annotations

import json
import os
from typing import Any

from dspark_jax.decode.calibrate import format_report

PAPER_NOTE = ("Paper (Table 1, Qwen3-4B/8B/14B, T=1): τ(DSpark) > τ(DFlash) > τ(Eagle3) on every benchmark; "
              "DSpark/DFlash = 1.16-1.18 averaged over benchmarks.")


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (draft, batch size, dataset): tau, accept_rate@0..2, speculative / plain tokens/s, speed-up."""
    rows = []
    for kind, by_batch in results["drafts"].items():
        for batch, res in by_batch.items():
            for d in res["datasets"]:
                rates = d.get("accept_rate") or []
                rows.append({"draft": kind, "batch": int(batch.removeprefix("batch")), "dataset": d["dataset"],
                             "samples": d["samples"], "tau": d["tau"],
                             "accept_rate": [r for r in rates if r is not None],
                             "spec_tps": d["speculative"]["tokens_per_s"], "plain_tps": d["plain"]["tokens_per_s"],
                             "speedup": d["speedup"], "greedy_match": d.get("greedy_match_rate")})
    return rows


def tau_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """τ(DSpark)/τ(DFlash) and τ(DSpark)/τ(Eagle3) per (dataset, batch)."""
    by = {(r["draft"], r["batch"], r["dataset"]): r["tau"] for r in rows}
    out = {}
    for (kind, b, ds), tau in by.items():
        if kind != "dspark":
            continue
        for other in ("dflash", "eagle3"):
            if (other, b, ds) in by and by[(other, b, ds)]:
                out[f"{ds}/batch{b}: dspark/{other}"] = tau / by[(other, b, ds)]
    return out


def markdown(results: dict[str, Any]) -> str:
    rows = table_rows(results)
    lines = ["| draft | batch | dataset | n | τ | accept@0 | accept@1 | accept@2 | spec tok/s | plain tok/s | "
             "speed-up | greedy = plain |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = (r["accept_rate"] + [None] * 3)[:3]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {r['draft']} | {r['batch']} | {r['dataset']} | {r['samples']} | {r['tau']:.2f} | "
                     f"{fmt(acc[0])} | {fmt(acc[1])} | {fmt(acc[2])} | {r['spec_tps']:.0f} | {r['plain_tps']:.0f} | "
                     f"{r['speedup'] or 0:.2f}x | {fmt(r['greedy_match'])} |")
    lines.append("")
    if "eval_batch1_cores" in results:
        cores = results["eval_batch1_cores"]
        lines += [("Batch 1 timed in a child process pinned to core(s) " + ", ".join(map(str, cores))
                   + " (both loops; JAX sizes its CPU thread pool from the affinity)") if cores else
                  "Batch 1 timed in the demo's process, on all its cores.", ""]
    for k, v in tau_ratios(rows).items():
        lines.append(f"- τ ratio {k}: {v:.3f}")
    lines += ["", PAPER_NOTE]
    cal = results.get("calibration")
    if cal:
        lines += ["", f"Confidence calibration of the dspark draft (STS, fitted on {cal['fit_rounds']} rounds, "
                      f"reported on {cal['eval_rounds']} rounds of other held-out prompts):", "",
                  format_report(cal["positions"])]
    if "timings" in results:
        lines.append("")
        lines.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()))
    return "\n".join(lines) + "\n"


def plot_acceptance(results: dict[str, Any], path: str) -> bool:
    """accept_rate@k by position k, one line per draft (batch 1, held-out prompts), like the paper's Fig. 2."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in table_rows(results):
        if r["dataset"] != "heldout" or r["batch"] != min(int(b.removeprefix("batch"))
                                                         for b in results["drafts"][r["draft"]]):
            continue
        ax.plot(range(len(r["accept_rate"])), r["accept_rate"], marker="o", label=f"{r['draft']} (τ={r['tau']:.2f})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("accept_rate@k")
    ax.set_ylim(0, 1)
    ax.set_title("Acceptance by position, held-out prompts, greedy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out_dir: str, log=print) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(results))
    png = os.path.join(out_dir, "acceptance.png")
    if plot_acceptance(results, png):
        paths.append(png)
    else:
        log("[demo] matplotlib is not installed: no acceptance plot (pip install 'dspark_jax[plot]')")
    return paths


__all__ = ["write_report", "markdown", "table_rows", "tau_ratios", "plot_acceptance"]
