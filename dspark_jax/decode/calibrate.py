"""Confidence calibration (spec §4.7, §6.2 Fig. 6, §6.4): Sequential Temperature Scaling, ECE, AUC, reliability.

The confidence head predicts, per draft position k, the *conditional* acceptance ``c_k = sigmoid(z_k)``; what the
scheduler uses is the prefix survival ``a_k = prod_{i<=k} c_i``. STS fits one temperature per position, left to
right: ``T_k`` minimises the ECE of ``prod_{i<=k} sigmoid(z_i / T_i)`` against the prefix-survival label
(``m > k``) with ``T_0..T_{k-1}`` already fixed (a 1-D grid search). Dividing a logit by ``T > 0`` is monotone,
so every position's confidence keeps its ranking (its conditional AUC is unchanged); the AUC of the cumulative
product may move slightly, since the positions are rescaled differently.

Where the temperatures live: ``sts_temperatures.json`` in the draft directory (written by ``dspark calibrate``).
``dj.load_draft`` attaches them as ``draft.sts_temperatures`` and ``dj.speculative_generate`` applies them
(``sigmoid(z_k / T_k)``) to the threshold, the scheduler and the recorded confidences; its ``calibration=``
argument overrides that (False = raw confidences, a sequence, or a path).

Data layout: per round (one row's proposal) ``z [M, Bs]`` raw confidence logits, ``labels [M, Bs]`` prefix
survival (``k < m``), ``valid [M, Bs]`` (position proposed, ``k < L``, in a non-terminal round).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from dspark_jax.decode.metrics import accepted_drafts_from_outcome
from dspark_jax.decode.speculative import spec_slot_engine
from dspark_jax.drafts.temperatures import (  # noqa: F401  (part of this module's API, as before)
    TEMPERATURES_FILE,
    attach_saved_temperatures,
    attach_temperatures,
    check_temperatures,
    load_temperatures,
    resolve_temperatures,
    save_temperatures,
)

ECE_BINS = 20   # spec §4.7


# ---- metrics --------------------------------------------------------------------------------------------

def ece(pred, label, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins: sum_b n_b/N |mean(pred_b) - mean(label_b)|."""
    pred = np.asarray(pred, np.float64).reshape(1, -1)
    return float(_ece_many(pred, np.asarray(label, np.float64).reshape(-1), bins)[0])


def _ece_many(preds: np.ndarray, label: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of ``preds [G, n]`` against ``label [n]`` -> ``[G]`` (one bincount for all G)."""
    g, n = preds.shape
    if n == 0:
        return np.zeros(g)
    b = np.minimum((preds * bins).astype(np.int64), bins - 1)
    flat = (b + bins * np.arange(g)[:, None]).reshape(-1)
    psum = np.bincount(flat, weights=preds.reshape(-1), minlength=g * bins).reshape(g, bins)
    lsum = np.bincount(flat, weights=np.broadcast_to(label, preds.shape).reshape(-1),
                       minlength=g * bins).reshape(g, bins)
    return np.abs(psum - lsum).sum(axis=1) / n


def auc(score, label) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if a class is missing."""
    score = np.asarray(score, np.float64).reshape(-1)
    label = np.asarray(label, bool).reshape(-1)
    n1 = int(label.sum())
    n0 = label.size - n1
    if n1 == 0 or n0 == 0:
        return None
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0          # 1-based average rank of each distinct value
    ranks = avg_rank[inv]
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))   # no overflow warnings for large |z|


def cumulative(z: np.ndarray, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """``[M, Bs]`` logits -> prefix survival predictions ``prod_{i<=k} sigmoid(z_i / T_i)``."""
    z = np.asarray(z, np.float64)
    t = np.ones(z.shape[1]) if temperatures is None else np.asarray(temperatures, np.float64)
    return np.cumprod(_sigmoid(z / t[None, :]), axis=1)


# ---- STS --------------------------------------------------------------------------------------------------

def default_grid() -> np.ndarray:
    """Log-spaced temperatures 0.05 .. 20 (241 points, ~2.5% apart)."""
    return np.exp(np.linspace(math.log(0.05), math.log(20.0), 241))


def fit_sts(z, labels, valid=None, *, grid: Sequence[float] | None = None, bins: int = ECE_BINS,
            refine: bool = True) -> tuple[float, ...]:
    """Sequential Temperature Scaling: one temperature per position, fit left to right.

    Args:
      z: ``[M, Bs]`` raw confidence logits; labels: ``[M, Bs]`` prefix survival (bool); valid: ``[M, Bs]``
        which entries count (default all).
      grid: candidate temperatures (default :func:`default_grid`); with ``refine`` a second, 41-point grid
        spans one coarse step either side of the best.
    Returns: ``Bs`` temperatures (1.0 for a position without data). Ties go to the first grid point.
    """
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels, bool)
    valid = np.ones_like(labels) if valid is None else np.asarray(valid, bool)
    if z.ndim != 2 or z.shape != labels.shape or z.shape != valid.shape:
        raise ValueError(f"z, labels and valid must be [M, Bs] of one shape, got {z.shape}, {labels.shape}, "
                         f"{valid.shape}")
    if not np.isfinite(z[valid]).all():
        raise ValueError("confidence logits contain NaN or inf")
    coarse = np.asarray(default_grid() if grid is None else grid, np.float64)
    if coarse.ndim != 1 or coarse.size == 0 or not (coarse > 0).all():
        raise ValueError("grid must be a non-empty 1-D list of positive temperatures")
    temps: list[float] = []
    prev = np.ones(z.shape[0])                      # prod_{i<k} sigmoid(z_i / T_i) with fitted T_i
    for k in range(z.shape[1]):
        rows = valid[:, k]
        if rows.any():
            zk, base, lab = z[rows, k], prev[rows], labels[rows, k].astype(np.float64)

            def best(cands):
                preds = base[None, :] * _sigmoid(zk[None, :] / cands[:, None])
                return int(np.argmin(_ece_many(preds, lab, bins)))

            i = best(coarse)
            t = coarse[i]
            if refine and coarse.size > 1:
                lo = coarse[max(i - 1, 0)]
                hi = coarse[min(i + 1, coarse.size - 1)]
                fine = np.exp(np.linspace(math.log(lo), math.log(hi), 41))
                t = fine[best(fine)]
        else:
            t = 1.0
        temps.append(float(t))
        prev = prev * _sigmoid(z[:, k] / t)
    return tuple(temps)


def calibration_report(z, labels, valid=None, temperatures: Sequence[float] | None = None,
                       bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per position k (1-based ``position``): rounds n, label mean, ECE / AUC / Brier / mean prediction of the
    cumulative product before (raw) and after (``temperatures``), and the conditional AUC of ``c_k`` on rounds
    whose first k-1 drafts survived (unchanged by any positive temperature)."""
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels, bool)
    valid = np.ones_like(labels) if valid is None else np.asarray(valid, bool)
    raw = cumulative(z)
    cal = cumulative(z, temperatures) if temperatures is not None else raw
    out = []
    for k in range(z.shape[1]):
        rows = valid[:, k]
        lab = labels[rows, k]
        cond_rows = rows & (labels[:, k - 1] if k > 0 else True)
        entry = {"position": k + 1, "n": int(rows.sum()), "label_mean": float(lab.mean()) if lab.size else None}
        for tag, pred in (("before", raw[rows, k]), ("after", cal[rows, k])):
            entry[f"ece_{tag}"] = ece(pred, lab, bins) if lab.size else None
            entry[f"auc_{tag}"] = auc(pred, lab)
            entry[f"brier_{tag}"] = float(np.mean((pred - lab) ** 2)) if lab.size else None
            entry[f"pred_mean_{tag}"] = float(pred.mean()) if lab.size else None
        entry["auc_conditional"] = auc(z[cond_rows, k], labels[cond_rows, k])
        if temperatures is not None:
            entry["temperature"] = float(temperatures[k])
        out.append(entry)
    return out


def reliability_bins(pred, label, bins: int = ECE_BINS):
    """Per non-empty bin: (mean prediction, accuracy, count) for a reliability diagram."""
    pred = np.asarray(pred, np.float64)
    label = np.asarray(label, np.float64)
    b = np.minimum((pred * bins).astype(np.int64), bins - 1)
    n = np.bincount(b, minlength=bins)
    ps = np.bincount(b, weights=pred, minlength=bins)
    ls = np.bincount(b, weights=label, minlength=bins)
    keep = n > 0
    return ps[keep] / n[keep], ls[keep] / n[keep], n[keep]


def reliability_diagram(z, labels, valid, temperatures, path: str, positions: Sequence[int] | None = None,
                        bins: int = ECE_BINS, log=print) -> str | None:
    """Draws the paper's Fig. 6 (accuracy vs confidence per position, before and after STS) to ``path``.

    Returns the path, or None (with a message) when matplotlib is not installed: it is an optional dependency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[calibrate] matplotlib is not installed: skipping the reliability diagram "
            "(pip install 'dspark_jax[plot]')")
        return None
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels, bool)
    valid = np.asarray(valid, bool)
    bs = z.shape[1]
    if positions is None:
        positions = [p for p in (1, 3, 5, 7) if p <= bs] or [1]
    raw, cal = cumulative(z), cumulative(z, temperatures)
    fig, axes = plt.subplots(1, len(positions), figsize=(3.2 * len(positions), 3.3), squeeze=False)
    for ax, p in zip(axes[0], positions):
        k = p - 1
        rows = valid[:, k]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for tag, pred, color in (("raw", raw[rows, k], "tab:red"), ("STS", cal[rows, k], "tab:blue")):
            mp, acc, _ = reliability_bins(pred, labels[rows, k], bins)
            e = ece(pred, labels[rows, k], bins) if rows.any() else float("nan")
            ax.plot(mp, acc, marker="o", ms=3, color=color, label=f"{tag} ECE {100 * e:.1f}%")
        ax.set_title(f"position {p} (n={int(rows.sum())})")
        ax.set_xlabel("predicted prefix survival")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("observed acceptance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- recorded rounds -> samples -----------------------------------------------------------------------------

def rounds_to_samples(rounds: dict[str, np.ndarray]):
    """Recorded rounds (``[N, rounds(, Bs)]`` arrays: ``confidence_logits``, ``outcome``, ``proposal_lengths``,
    ``accept_lengths``, ``accepted_drafts``) -> (z, labels, valid) ``[M, Bs]`` over rounds that happened.

    A terminal round (a stop token among the accepted drafts) is left out: its cut is not a rejection."""
    z = np.asarray(rounds["confidence_logits"], np.float64)
    outcome = np.asarray(rounds["outcome"], bool)
    acc = np.asarray(rounds["accept_lengths"])
    prop = np.asarray(rounds["proposal_lengths"])
    m = np.asarray(rounds["accepted_drafts"])
    bs = z.shape[-1]
    keep = (acc > 0) & (m != acc)
    z, outcome, prop = z[keep], outcome[keep], prop[keep]
    valid = np.arange(bs)[None, :] < prop[:, None]
    return z, outcome, valid


def record_rounds(target, draft, prompts: list[list[int]], *, max_new_tokens: int = 256, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                  stop_token_ids: Sequence[int] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Runs full-block speculative decoding (threshold 0, no scheduler, raw confidences) over ``prompts`` through
    a slot engine of ``batch_size`` slots (continuous batching; prompt ``i`` samples with request id ``i``) and
    returns the per-round arrays of :func:`rounds_to_samples` plus ``prompt_index [N]``, in prompt order."""
    if not draft.config.has_confidence:
        raise ValueError("calibration needs a draft with a confidence head")
    if not prompts:
        raise ValueError("no prompts to calibrate on")
    engine = spec_slot_engine(target, draft, num_slots=max(1, min(batch_size, len(prompts))),
                              max_prompt_len=max(len(p) for p in prompts), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, threshold=0.0, scheduler=None,
                              stop_token_ids=stop_token_ids, seed=seed, calibration=False)
    for i, p in enumerate(prompts):
        engine.submit(i, p, tag=i)
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc="calibrate", unit="prompt", file=sys.stderr)
    results = {}
    for i, res in engine.run():
        results[i] = res
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(len(prompts)):
        res = results[i]
        for key, val in (("prompt_index", np.asarray([i], np.int64)), ("confidence_logits", res.conf_logits[None]),
                         ("outcome", res.outcome[None]), ("proposal_lengths", res.proposed[None]),
                         ("accept_lengths", res.accept[None]),
                         ("accepted_drafts", accepted_drafts_from_outcome(res.outcome[None]))):
            parts.setdefault(key, []).append(np.asarray(val))
    return _stack(parts)


def _stack(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates per-batch ``[b, rounds, ...]`` arrays along rows, zero-padding the rounds axis (batches
    run different numbers of rounds; zero = "no round", as in the loop's own arrays)."""
    out = {}
    for key, vals in parts.items():
        if vals[0].ndim == 1:
            out[key] = np.concatenate(vals)
            continue
        width = max(v.shape[1] for v in vals)
        out[key] = np.concatenate([np.pad(v, [(0, 0), (0, width - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
                                   for v in vals])
    return out


@dataclasses.dataclass
class CalibrationResult:
    temperatures: tuple[float, ...]
    report: list[dict[str, Any]]      # on the held-out rounds (all rounds when nothing is held out)
    fit_rounds: int
    eval_rounds: int


def fit_from_rounds(rounds: dict[str, np.ndarray], holdout: float = 0.5, seed: int = 0) -> CalibrationResult:
    """Fits STS on a random ``1 - holdout`` share of the prompts and reports ECE/AUC on the rest."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    prompt = np.asarray(rounds["prompt_index"])
    uniq = np.unique(prompt)
    rng = np.random.default_rng(seed)
    n_eval = int(round(holdout * uniq.size)) if uniq.size > 1 else 0
    eval_ids = set(rng.permutation(uniq)[:n_eval].tolist())
    is_eval = np.array([p in eval_ids for p in prompt], bool)

    def sub(mask):
        return {k: np.asarray(v)[mask] for k, v in rounds.items()}

    z_fit, l_fit, v_fit = rounds_to_samples(sub(~is_eval))
    temps = fit_sts(z_fit, l_fit, v_fit)
    z_ev, l_ev, v_ev = rounds_to_samples(sub(is_eval)) if n_eval else (z_fit, l_fit, v_fit)
    return CalibrationResult(temps, calibration_report(z_ev, l_ev, v_ev, temps), int(z_fit.shape[0]),
                             int(z_ev.shape[0]))


def format_report(report: list[dict[str, Any]]) -> str:
    def f(x, scale=1.0, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x * scale)

    lines = ["| position | n | T | ECE raw | ECE STS | AUC raw | AUC STS | AUC cond. | accept |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report:
        lines.append(f"| {e['position']} | {e['n']} | {f(e.get('temperature'))} | {f(e['ece_before'], 100, '{:.2f}%')} "
                     f"| {f(e['ece_after'], 100, '{:.2f}%')} | {f(e['auc_before'])} | {f(e['auc_after'])} | "
                     f"{f(e['auc_conditional'])} | {f(e['label_mean'])} |")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------

__all__ = ["ece", "auc", "cumulative", "fit_sts", "calibration_report", "reliability_bins", "reliability_diagram",
           "save_temperatures", "load_temperatures", "attach_temperatures", "attach_saved_temperatures",
           "resolve_temperatures", "rounds_to_samples", "record_rounds", "fit_from_rounds", "CalibrationResult",
           "format_report", "TEMPERATURES_FILE", "default_grid"]
