"""Acceptance metrics of speculative decoding (spec §4.7), as pure functions over per-round arrays.

Per round the decoder records the acceptance length ``a`` (accepted drafts + the bonus / residual token; a
terminal round whose accepted drafts contain a stop token contributes only the accepted drafts ``m``, no
bonus), the proposal length ``L`` (drafts verified) and, optionally, the accepted-draft count ``m``.
``0`` in ``accept_lengths`` marks "no round" (a row that had already stopped), so arrays may be padded.

Aggregation follows DeepSpec's evaluator (``deepspec/eval/base_evaluator.py``): every quantity is a ratio of
*sums over rounds*, so batches and datasets combine by adding :class:`RoundCounts`, never by averaging means:

- ``tau`` (acceptance length) = Σa / #rounds (bonus included; a terminal stop round contributes m);
- ``mean_proposal`` ("#propose", printed ``x.xx+1``) = ΣL / #rounds, where a terminal round counts its
  *effective* proposal length m (the drafts up to and including the stop token);
- ``verify_rate`` = Σa / (ΣL + #rounds): committed tokens per verified position;
- ``accept_rate@k`` = #rounds with m > k / #rounds with L > k (unconditional prefix survival, None when no
  round proposed a (k+1)-th draft);
- ``conditional_accept_rate@k`` = accept_rate@k / accept_rate@(k-1) (the paper's Fig. 2; k=0: accept_rate@0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class RoundCounts:
    """Sufficient statistics of a set of rounds; ``a + b`` merges two sets (batches, datasets, hosts)."""

    max_positions: int
    samples: int = 0
    rounds: int = 0
    accept_sum: int = 0
    proposal_sum: int = 0
    terminal_rounds: int = 0
    proposals_at: np.ndarray = None  # [K]: rounds with L > k
    accepted_at: np.ndarray = None   # [K]: rounds with m > k

    def __post_init__(self):
        k = int(self.max_positions)
        if k < 1:
            raise ValueError(f"max_positions must be >= 1, got {self.max_positions}")
        self.proposals_at = np.zeros(k, np.int64) if self.proposals_at is None else np.asarray(self.proposals_at,
                                                                                                 np.int64)
        self.accepted_at = np.zeros(k, np.int64) if self.accepted_at is None else np.asarray(self.accepted_at,
                                                                                              np.int64)
        if self.proposals_at.shape != (k,) or self.accepted_at.shape != (k,):
            raise ValueError("proposals_at / accepted_at must have shape [max_positions]")

    def __add__(self, other: RoundCounts) -> RoundCounts:
        if not isinstance(other, RoundCounts):
            return NotImplemented
        if other.max_positions != self.max_positions:
            raise ValueError(f"cannot merge counts over {self.max_positions} and {other.max_positions} positions")
        return RoundCounts(self.max_positions, self.samples + other.samples, self.rounds + other.rounds,
                           self.accept_sum + other.accept_sum, self.proposal_sum + other.proposal_sum,
                           self.terminal_rounds + other.terminal_rounds,
                           self.proposals_at + other.proposals_at, self.accepted_at + other.accepted_at)

    def to_dict(self) -> dict[str, Any]:
        return {"max_positions": self.max_positions, "samples": self.samples, "rounds": self.rounds,
                "accept_sum": self.accept_sum, "proposal_sum": self.proposal_sum,
                "terminal_rounds": self.terminal_rounds, "proposals_at": self.proposals_at.tolist(),
                "accepted_at": self.accepted_at.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundCounts:
        return cls(**d)


def accepted_drafts_from_outcome(round_outcome: np.ndarray) -> np.ndarray:
    """``[B, rounds, K]`` per-slot accepted flags (``GenerationOutput.stats['_round_outcome']``) -> m
    ``[B, rounds]``."""
    return np.asarray(round_outcome).astype(np.int64).sum(axis=-1)


def round_counts(accept_lengths, proposal_lengths, accepted_drafts=None, *, max_positions: int | None = None,
                 samples: int | None = None) -> RoundCounts:
    """Sums over the rounds of ``[B, R]`` (or flat ``[R]``) arrays; entries with ``accept_lengths == 0`` are skipped.

    Args:
      accept_lengths: a per round (m + 1; m for a terminal stop round).
      proposal_lengths: L per round (as proposed, before any stop-token cut).
      accepted_drafts: m per round. It tells terminal rounds apart (there ``m == a``); without it every round is
        taken as non-terminal (m = a - 1), which undercounts m by one on terminal rounds.
      max_positions: K, the number of accept_rate@k positions (the draft's block size); default max L.
      samples: sequences these rounds come from (default: the number of rows B, or 1 for flat arrays).
    """
    acc = np.asarray(accept_lengths, np.int64)
    prop = np.asarray(proposal_lengths, np.int64)
    if acc.shape != prop.shape:
        raise ValueError(f"accept_lengths {acc.shape} and proposal_lengths {prop.shape} differ in shape")
    if samples is None:
        samples = acc.shape[0] if acc.ndim == 2 else 1
    had = acc > 0
    if accepted_drafts is None:
        m = np.maximum(acc - 1, 0)
    else:
        m = np.asarray(accepted_drafts, np.int64)
        if m.shape != acc.shape:
            raise ValueError(f"accepted_drafts {m.shape} and accept_lengths {acc.shape} differ in shape")
    terminal = had & (m == acc)
    if np.any(had & ~terminal & (m != acc - 1)):
        raise ValueError("inconsistent rounds: accepted_drafts must be accept_lengths - 1 (or equal on a "
                         "terminal stop round)")
    eff_prop = np.where(terminal, m, prop)
    if np.any(had & (m > eff_prop)):
        raise ValueError("inconsistent rounds: more drafts accepted than proposed")
    a, L, m = acc[had], eff_prop[had], m[had]
    k = int(max_positions if max_positions is not None else max(int(L.max(initial=0)), 1))
    if L.size and int(L.max()) > k:
        raise ValueError(f"a proposal length {int(L.max())} exceeds max_positions={k}")
    pos = np.arange(k)
    return RoundCounts(max_positions=k, samples=int(samples), rounds=int(a.size), accept_sum=int(a.sum()),
                       proposal_sum=int(L.sum()), terminal_rounds=int(terminal.sum()),
                       proposals_at=(L[:, None] > pos[None, :]).sum(axis=0),
                       accepted_at=(m[:, None] > pos[None, :]).sum(axis=0))


def summarize(counts: RoundCounts) -> dict[str, Any]:
    """The §4.7 metrics of merged counts (zeros / None when there was no round)."""
    n = counts.rounds
    rates: list[float | None] = [
        float(acc / prop) if prop else None for acc, prop in zip(counts.accepted_at, counts.proposals_at)]
    cond: list[float | None] = []
    for k, r in enumerate(rates):
        prev = 1.0 if k == 0 else rates[k - 1]
        cond.append(None if r is None or not prev else float(r / prev))
    mean_prop = counts.proposal_sum / n if n else 0.0
    return {
        "samples": counts.samples,
        "rounds": n,
        "tau": counts.accept_sum / n if n else 0.0,
        "mean_proposal": mean_prop,
        "propose": f"{mean_prop:.2f}+1",
        "verify_rate": counts.accept_sum / (counts.proposal_sum + n) if n else 0.0,
        "accept_rate": rates,
        "conditional_accept_rate": cond,
        "terminal_rounds": counts.terminal_rounds,
    }


def output_counts(out, max_positions: int, rows: int | None = None) -> RoundCounts:
    """Counts of a speculative :class:`GenerationOutput`, over its first ``rows`` rows (the rest: batch padding)."""
    rows = len(out.lengths) if rows is None else rows
    outcome = out.stats.get("_round_outcome")
    drafts = None if outcome is None else accepted_drafts_from_outcome(outcome)[:rows]
    return round_counts(out.accept_lengths[:rows], out.proposal_lengths[:rows], drafts,
                        max_positions=max_positions, samples=rows)


__all__ = ["RoundCounts", "round_counts", "summarize", "accepted_drafts_from_outcome", "output_counts"]
