"""Confidence schedulers (spec §6.4): per-row proposal lengths from the draft's per-position confidences.

Reading of the paper's Algorithm 1 (hardware-aware prefix scheduler) that this module implements
------------------------------------------------------------------------------------------------------
Inputs per round: the confidences ``c [R, Bs]`` of the R active requests (``c[r, j-1]`` is the predicted
probability that draft ``j`` is accepted *given* drafts ``1..j-1`` were) and a pre-profiled table
``sps [Bmax+1]``: target verify steps per second when a step verifies ``B`` tokens in total.

- ``a[r, j] = prod_{i<=j} c[r, i]`` (1-based j) is the predicted probability that request r's first j drafts all
  survive, i.e. that verifying draft j adds one expected accepted token.
- **B counts every verified token, anchors included**: each request always verifies its anchor ``x_start``
  (L=0 is a plain decoding step), so ``B = R + sum_r L_r``.
- **tau counts expected committed tokens, bonus included**: a request with ``L_r`` drafts commits
  ``m_r + 1`` tokens (accepted drafts + the residual / bonus token), with ``E[m_r + 1] = 1 + sum_{j<=L_r} a[r, j]``,
  so ``tau = R + sum_r sum_{j<=L_r} a[r, j]`` (the batch's expected committed tokens, not a per-request mean).
- Objective: ``Theta = tau * SPS(B)``, expected committed tokens per second. Start at ``L = 0``:
  ``B = R, tau = R, Theta_best = R * SPS(R)`` (plain decoding). Visit the pairs (r, j) with ``a > 0`` in
  descending order of ``a``; admitting one sets ``L_r = j``, ``B += 1``, ``tau += a[r, j]``. Keep it when
  ``Theta > Theta_best``; **stop at the first pair that does not improve Theta** (the break).
- A batch larger than the table (``B > Bmax``) is infeasible: such an admission counts as no improvement.

Why the break keeps decoding lossless. Rejection sampling is lossless for any proposal length chosen by a
*stopping rule*: whether draft j is verified may depend on the context and on drafts ``1..j-1``, but not on
draft j itself or later ones. ``c[r, j]`` is computed from the previous draft token (spec §4.3: ``prev_k``), so
``a[r, j]`` is a function of drafts ``1..j-1`` only. With the break, the pair (r, j) is admitted iff every
step up to its position in the sorted order improved Theta; those steps involve only pairs with ``a >= a[r, j]``,
which within row r are ``j' <= j`` (``a`` is non-increasing along j and ties are broken by (row, j)), plus other
rows' pairs, which are independent of row r's drafts given the context. So ``L_r >= j`` is decided from row r's
drafts ``< j``. Without the break (global arg-max over all prefixes of the sorted order), ``L_r >= j`` also
depends on ``a[r, j+1], a[r, j+2], ...``, i.e. on draft j itself: verifying a draft because *it* was a good
draft biases the output (the paper's Appendix A, reproduced in tests/decode/test_scheduler.py: target (0.7,
0.3), no-break output (0.85, 0.15)).

Zero-overhead scheduling (ZOS). The capacity ``K`` (how many draft tokens the step verifies) is fixed from
the confidences of the round two steps earlier, with a *global* search (arg-max of Theta over all prefixes, no
break: it copes with jagged SPS curves); the current round then admits the top-K pairs by up-to-date ``a``.
That stays lossless: K is already fixed (old information), and whether (r, j) is in the top K depends only on
pairs ranked above it, i.e. on row r's drafts ``< j`` and other rows.

Ties: pairs are ordered by ``a`` descending, then by row, then by position (a stable sort of the row-major
flattening), so equal ``a`` within a row (a confidence of exactly 1) is admitted left to right and every
row's admitted set is a prefix. Everything is vectorised (one sort + cumulative sums) and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

# ---- input checks (host side, only when the inputs are concrete) ---------------------------------------

def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_confidences(confidences, name: str = "confidences") -> None:
    """Raises ValueError unless ``confidences`` is ``[R, Bs]`` with every entry in [0, 1] (NaN is rejected).

    Traced values are not checked (inside jit a NaN confidence gives ``a = NaN``, which is never admitted)."""
    if not _is_concrete(confidences):
        return
    c = np.asarray(confidences)
    if c.ndim != 2:
        raise ValueError(f"{name} must be [R, Bs], got shape {c.shape}")
    if np.isnan(c).any():
        r, j = np.argwhere(np.isnan(c))[0]
        raise ValueError(f"{name} contain NaN (first at row {r}, position {j})")
    bad = (c < 0) | (c > 1)
    if bad.any():
        r, j = np.argwhere(bad)[0]
        raise ValueError(f"{name} must lie in [0, 1]; row {r}, position {j} is {c[r, j]!r}")


def check_sps(sps, rows: int | None = None) -> None:
    """Raises ValueError unless ``sps`` is a 1-D table ``[Bmax+1]`` (index = verified tokens B) whose entries
    ``1..Bmax`` are finite and > 0 (entry 0 is never read: a step verifies at least one token) and which covers
    at least ``rows`` tokens (the anchors alone: B = R)."""
    if not _is_concrete(sps):
        return
    s = np.asarray(sps, np.float64)
    if s.ndim != 1:
        raise ValueError(f"sps must be a 1-D table [Bmax+1] indexed by verified tokens B, got shape {s.shape}")
    if s.shape[0] < 2:
        raise ValueError(f"sps table is too short ({s.shape[0]} entries): it needs SPS(B) for B = 1 .. Bmax")
    if rows is not None and s.shape[0] < rows + 1:
        raise ValueError(f"sps table is too short: it covers B <= {s.shape[0] - 1} verified tokens, but {rows} "
                         f"requests verify at least their {rows} anchors (need >= {rows + 1} entries)")
    body = s[1:]
    bad = ~np.isfinite(body) | (body <= 0)
    if bad.any():
        b = int(np.argmax(bad)) + 1
        raise ValueError(f"sps must be finite and > 0 for B >= 1; SPS({b}) = {s[b]!r}")


# ---- the vectorised core --------------------------------------------------------------------------------

def cumulative_acceptance(confidences: jax.Array) -> jax.Array:
    """``[R, Bs]`` conditional confidences -> ``a [R, Bs]``, ``a[:, j] = prod_{i<=j} c[:, i]``.

    Multiplied left to right (an unrolled loop over the Bs positions, not a scan) so the result is exactly the
    sequential float32 product: ``a`` is then non-increasing along j bit for bit (``x * c <= x`` for c <= 1)."""
    c = jnp.asarray(confidences, jnp.float32)
    cols = [c[:, 0]]
    for j in range(1, c.shape[1]):
        cols.append(cols[-1] * c[:, j])
    return jnp.stack(cols, axis=1)


def _sorted_pairs(a: jax.Array, active: jax.Array):
    """Pairs (r, j) ordered by a descending, ties by row-major index; inactive / a <= 0 pairs last.

    Returns (sorted a ``[N]`` (0 for the excluded), valid ``[N]`` bool, flat index ``[N]``), N = R*Bs."""
    r, bs = a.shape
    valid = active[:, None] & (a > 0)              # NaN > 0 is False: a NaN confidence is never admitted
    key = jnp.where(valid, -a, 1.0).reshape(-1)    # -a in [-1, 0) for valid pairs, 1 sorts them last
    idx = jnp.arange(r * bs, dtype=jnp.int32)
    key_s, idx_s = jax.lax.sort((key, idx), num_keys=1, is_stable=True)
    ok = key_s < 1.0
    return jnp.where(ok, -key_s, 0.0), ok, idx_s


def _objective(sorted_a: jax.Array, ok: jax.Array, n_rows: jax.Array, sps: jax.Array) -> jax.Array:
    """Theta after admitting the first k sorted pairs, k = 0..N: ``[N+1]`` (-inf where infeasible)."""
    bmax = sps.shape[0] - 1
    n = sorted_a.shape[0]
    k = jnp.arange(n + 1, dtype=jnp.int32)
    tau = n_rows.astype(jnp.float32) + jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(sorted_a)])
    b = n_rows + k
    feasible = (b <= bmax) & jnp.concatenate([jnp.ones((1,), bool), ok])
    theta = tau * sps[jnp.clip(b, 0, bmax)]
    return jnp.where(feasible, theta, -jnp.inf)


def _lengths_from_admitted(admitted_sorted: jax.Array, idx_s: jax.Array, shape) -> jax.Array:
    r, bs = shape
    flat = jnp.zeros((r * bs,), jnp.int32).at[idx_s].set(admitted_sorted.astype(jnp.int32))
    return flat.reshape(r, bs).sum(axis=1).astype(jnp.int32)


def _prepare(confidences, sps, active):
    check_confidences(confidences)
    c = jnp.asarray(confidences, jnp.float32)
    rows = c.shape[0]
    if active is not None and _is_concrete(active):
        rows = int(np.sum(np.asarray(active, bool)))
    check_sps(sps, rows)
    s = jnp.asarray(sps, jnp.float32)
    act = jnp.ones((rows,), bool) if active is None else jnp.asarray(active, bool)
    return c, s, act


def prefix_schedule(confidences, sps, active=None, *, early_stop: bool = True) -> jax.Array:
    """Algorithm 1 (hardware-aware prefix scheduler): proposal lengths ``L [R]`` int32 in ``0..Bs``.

    Args:
      confidences: ``[R, Bs]`` per-position conditional confidences in [0, 1] (calibrated sigmoids).
      sps: ``[Bmax+1]`` steps per second by verified-token count B (anchors included); entry 0 unused.
      active: optional ``[R]`` bool; inactive rows get L=0 and count neither in B nor in tau.
      early_stop: True (the paper's algorithm, lossless) stops at the first pair that does not improve
        Theta. False searches globally (arg-max over all prefixes of the sorted order). **False is not
        lossless** when used with the current round's confidences (Appendix A); it exists to demonstrate that
        and as the capacity search of :func:`zos_capacity`.
    """
    c, s, act = _prepare(confidences, sps, active)
    return _prefix_core(c, s, act, bool(early_stop))


@functools.partial(jax.jit, static_argnames=("early_stop",))
def _prefix_core(c, s, act, early_stop):
    # jitted so eager calls (benchmarks, tests) do not dispatch op by op; inlined when called under a trace
    a = cumulative_acceptance(c)
    sorted_a, ok, idx_s = _sorted_pairs(a, act)
    theta = _objective(sorted_a, ok, jnp.sum(act.astype(jnp.int32)), s)
    if early_stop:
        improves = theta[1:] > theta[:-1]          # Theta_best == Theta_{k-1} as long as nothing broke yet
        count = jnp.sum(jnp.cumprod(improves.astype(jnp.int32)))
    else:
        count = jnp.argmax(theta)                  # first maximum: a strict '>' search records the first best
    admitted = jnp.arange(sorted_a.shape[0]) < count
    return _lengths_from_admitted(admitted, idx_s, a.shape)


def zos_capacity(old_confidences, sps, old_active=None) -> jax.Array:
    """ZOS capacity K (int32 scalar): the draft-token count maximising Theta for an *earlier* round's
    confidences ``[R', Bs]``, by global search (no break). K depends only on old information."""
    c, s, act = _prepare(old_confidences, sps, old_active)
    return _capacity_core(c, s, act)


@jax.jit
def _capacity_core(c, s, act):
    a = cumulative_acceptance(c)
    sorted_a, ok, _ = _sorted_pairs(a, act)
    theta = _objective(sorted_a, ok, jnp.sum(act.astype(jnp.int32)), s)
    return jnp.argmax(theta).astype(jnp.int32)


def top_k_lengths(confidences, capacity, sps, active=None) -> jax.Array:
    """Admits the top ``capacity`` pairs of the current round by up-to-date ``a`` (those with ``a > 0`` and
    while ``B <= Bmax``): lengths ``[R]`` int32. Lossless for any capacity fixed before this round."""
    c, s, act = _prepare(confidences, sps, active)
    return _top_k_core(c, jnp.asarray(capacity, jnp.int32), s, act)


@jax.jit
def _top_k_core(c, capacity, s, act):
    a = cumulative_acceptance(c)
    sorted_a, ok, idx_s = _sorted_pairs(a, act)
    n_rows = jnp.sum(act.astype(jnp.int32))
    k = jnp.arange(sorted_a.shape[0], dtype=jnp.int32)
    admitted = ok & (k < capacity) & (n_rows + k + 1 <= s.shape[0] - 1)
    return _lengths_from_admitted(admitted, idx_s, a.shape)


def zos_schedule(confidences, old_confidences, sps, active=None, old_active=None) -> jax.Array:
    """Zero-overhead scheduling: capacity from ``old_confidences`` (two rounds earlier, global search), tokens
    ranked by the current ``confidences``. Shapes: ``[R, Bs]``, ``[R', Bs]``, ``[Bmax+1]`` -> lengths ``[R]``."""
    return top_k_lengths(confidences, zos_capacity(old_confidences, sps, old_active), sps, active)


# ---- scheduler objects for dj.speculative_generate(scheduler=...) -----------------------------------------

def _sps_tuple(sps) -> tuple[float, ...]:
    if isinstance(sps, (str, bytes)):
        raise ValueError("sps must be a sequence of numbers (load a profile with load_sps)")
    table = tuple(float(x) for x in np.asarray(sps, np.float64).reshape(-1))
    check_sps(np.asarray(table))
    return table


# Switch-off (plain decoding for a while): the shortest plain run (it doubles while probes keep losing) and the
# longest, the EMA weight of the newest round's measured ratio, the hysteresis band (speculation resumes only when
# the smoothed ratio reaches 1 + SWITCH_MARGIN), and the probe budget: a plain run lasts long enough that the probe
# round after it, if it loses as much as the EMA says, costs at most this share of the run's time. The longest run
# is long because a probe costs more than its round: across calls (carry_switch) the call that probes runs the
# speculative loop for all its steps (draft prompt pass, in-loop plain steps), 15-37% dearer than a plain call on the
# demo pair at batch 1-4; with 512 about one 96-token call in five probed there and the scheduler lost 5-8% to plain.
SWITCH_FIRST_OFF = 8
SWITCH_MAX_OFF = 2048
SWITCH_EMA = 0.25
SWITCH_MARGIN = 0.05
SWITCH_PROBE_BUDGET = 0.02
# A plain run inside the loop goes in chunks of at most this many steps: the draft ingests each chunk's taps from a
# buffer [B, Bs+1+chunk, Lt*H] (so the buffer does not grow with the longest run), and no probe comes between chunks.
PLAIN_RUN_CHUNK = 128


# the part of the scheduler state that the switch-off rule keeps, and that a scheduler carries from one call to the
# next (_SchedulerBase.carry_switch)
SWITCH_FIELDS = ("ema", "off_mode", "off_left", "next_off", "scale")
# weight of the newest call in the carried call scale (call_scale)
SCALE_EMA = 0.5
# calls kept per path for the wall prices (measured / predicted seconds, _SchedulerBase.wall_factor; the price is the
# mean of the faster half, as the round profile takes its times). The profile's prices miss what a call pays around
# its rounds (the prefill, the draft's prompt pass) and are taken on one cache in short bursts: on the demo pair at
# batch 32 they put full-block calls at 0.94-1.10x plain decoding where the calls ran at 0.85-0.92x. An average
# over calls (weight 0.5 for the newest) followed bursts of load: one slow plain call turned speculation on (ZOS,
# demo pair, batch 8: 0.87x of plain).
WALL_SAMPLES = 8
# Where speculation never switches off, no plain call is timed but by a calibration call: while speculation stays on
# at a ratio below WALL_CALIBRATE_BELOW (on the profile's prices times the wall factor), the next call runs plain once
# WALL_CALIBRATE_AFTER * 2**k timed loop calls of a batch size have passed since its last timed plain call, k the
# calibration calls granted so far at that size (at most WALL_CALIBRATE_AFTER * 2**WALL_CALIBRATE_MAX_DOUBLINGS). 1.25:
# the wall factors measured on the demo pair were 0.75-0.93, so a ratio above 1.25 stays above 1 for any factor seen.
# The calls repeat, doubling apart, because otherwise one plain timing decides alone: on a shared machine plain calls
# ran 0.93-1.41x their prediction (demo pair, batch 8, where speculation goes off only while the factor is below
# ~0.83), so one slow timing could keep a losing speculation on for every later call. A calibration call costs at most
# a quarter of a call: at most 1/256 of a long run's calls once the gaps are 64.
WALL_CALIBRATE_AFTER = 2
WALL_CALIBRATE_BELOW = 1.25
WALL_CALIBRATE_MAX_DOUBLINGS = 5


def typical_seconds(times) -> float:
    """The mean of the faster half of ``times`` (at least one). On a shared machine noise only adds time, and a
    burst that covers half the repeats of one point moves its median (round profile, oracle pair, batch 32: the
    160-token round's median 34.6 ms against 30.5-31.4 in its quiet repeats made the schedule drop a draft that
    full blocks commit, 0.86x of full blocks' throughput)."""
    fast = sorted(float(t) for t in times)[:max(1, len(times) // 2)]
    return sum(fast) / len(fast)


def call_scale(committed) -> float:
    """How far the per-round ratio overstated a finished static-batch call, from its token counts alone (host side):
    ``committed [B, rounds]`` tokens each row committed per round (a plain step commits 1; 0 once a row is done).

    The loop runs until its slowest row is done, so plain decoding of the same call would have taken as many steps
    as the longest row has tokens, ``max_b sum_j committed[b, j]``. The per-round ratio credits round j with the
    mean tokens of its live rows (a plain step with 1), so it counts ``sum_j mean_live committed[:, j]`` plain
    steps' worth. Their quotient (1 for a call of plain steps) scales the next calls' per-round ratios: the rounds
    that a straggler adds (rows stop at different lengths and accept at different rates: demo pair, batch 8, 38.5
    rounds for 28.5 a row) are charged. Past calls only: lossless."""
    c = np.asarray(committed, np.float64)
    live = c > 0
    n_live = live.sum(axis=0)
    per_round = np.where(n_live > 0, c.sum(axis=0) / np.maximum(n_live, 1), 0.0)
    credited = float(per_round.sum())
    if credited <= 0:
        return 1.0
    return float(np.clip(c.sum(axis=1).max() / credited, 0.1, 10.0))


@dataclasses.dataclass(frozen=True)
class SchedulePolicy:
    """What a compiled decode loop keys on: the scheduling rule, not the tables (traced arguments, so a new
    curve of the same length does not recompile). ``kind``: "prefix" (Algorithm 1) or "zos"; ``switch``: the
    loop may run plain decoding steps (no draft work) when speculation loses.

    The loop's scheduler arguments are ``(sps [Bmax+1], plain_sps scalar)``: rounds per second by verified
    tokens B and plain decoding steps per second, on the same engine.

    Switch-off rule (every decision from finished rounds and the profile, so every round's lengths stay a
    stopping rule; see docs/SCHEDULING.md §8):

    - **Measured, not predicted:** after each speculative round, ``ratio = committed * SPS(B) / (R * plain_sps)``
      (the tokens the round actually committed over its R live rows, at the profile's rate for its B verified
      tokens, against R plain steps) is folded into an EMA. The confidences choose the lengths but do not decide
      the switch: a miscalibrated head would otherwise keep a losing speculation on.
    - EMA < 1: the next rounds are a plain run; EMA >= 1 + margin: speculation stays on. In between the mode does
      not change (hysteresis: no flapping on noise).
    - **Run length:** at least ``off_rounds[0]``, doubling while the probe round that ends each run still loses, and
      long enough that a probe losing as much as the EMA says costs at most SWITCH_PROBE_BUDGET of the run
      (``cost * (1 - EMA) / budget`` plain steps, ``cost = plain_sps / SPS(B)``: the round in plain steps); at most
      ``off_rounds[1]``. Across calls (``carry_switch``) the probe is the next call, so a run set after a call is
      priced on the call: ``(1 / ratio - 1) * its steps / budget`` (:meth:`after_call`).
    - **Call scale:** with ``carry_switch`` each finished call's :func:`call_scale` (rounds it ran against what the
      per-round ratios credited) becomes ``scale`` (the first call's replaces 1; later ones are averaged in with
      weight :data:`SCALE_EMA`), and the next calls' ratios are multiplied by it: the rounds a batch's slowest row
      adds are paid for.
    - **Never worth it:** when even a draft whose every token is accepted could not beat plain decoding on the
      profile (``max_B B * SPS(B) < R * plain_sps``), the loop runs plain steps without probing."""

    kind: str
    delay: int = 0
    switch: bool = False
    off_rounds: tuple[int, int] = (SWITCH_FIRST_OFF, SWITCH_MAX_OFF)    # shortest and longest plain run

    def init_state(self, batch: int, block_size: int, switch_state: dict | None = None):
        """The loop's scheduler state; ``switch_state`` (:data:`SWITCH_FIELDS`, e.g. where an earlier call ended)
        replaces the switch-off rule's fresh start."""
        inner = ()
        if self.kind == "zos":
            # ring buffer of the last `delay` speculative rounds' confidences and active masks
            inner = (jnp.zeros((self.delay, batch, block_size), jnp.float32), jnp.zeros((self.delay, batch), bool))
        state = dict(inner=inner, spec_rounds=jnp.int32(0), **self.fresh_switch_state())
        if switch_state is not None:
            state.update({k: jnp.asarray(switch_state[k], state[k].dtype) for k in SWITCH_FIELDS})
        return state

    def fresh_switch_state(self, xp=jnp) -> dict:
        """The switch-off rule's state before any round: speculation on, the EMA at 1."""
        return dict(ema=xp.float32(1.0), off_mode=xp.bool_(False), off_left=xp.int32(0),
                    next_off=xp.int32(self.off_rounds[0]), scale=xp.float32(1.0))

    def plain_steps(self, state, sched_args, active, xp=jnp, chunk: int | None = PLAIN_RUN_CHUNK) -> jax.Array:
        """Plain steps to run now (int32; 0 = a speculative round), from earlier rounds and the profile only: at
        most ``chunk`` (None: the whole run left). ``xp=numpy`` evaluates the same rule on the host (no device
        dispatch: a call decides in microseconds)."""
        if not self.switch:
            return xp.int32(0)
        if chunk is not None:
            return xp.minimum(self.plain_steps(state, sched_args, active, xp, None), chunk)
        sps, plain_sps = sched_args
        sps = xp.asarray(sps, xp.float32)
        live = xp.sum(xp.asarray(active, xp.int32))
        b = xp.arange(sps.shape[0])
        ceiling = xp.max(xp.where(b >= live, b * sps, 0.0))        # every verified token committed
        never = (live > 0) & (ceiling < live.astype(xp.float32) * xp.asarray(plain_sps, xp.float32))
        return xp.where(never, self.off_rounds[1], xp.minimum(state["off_left"], self.off_rounds[1]))

    def after_plain(self, state, steps=1, xp=jnp):
        return dict(state, off_left=xp.maximum(state["off_left"] - steps, 0))

    def __call__(self, confidences, active, state, sched_args):
        """``[B, Bs]`` confidences, ``[B]`` active, state, (sps, plain_sps) -> (L ``[B]``, state)."""
        sps, _ = sched_args
        sps = jnp.asarray(sps, jnp.float32)
        n = state["spec_rounds"]
        inner = state["inner"]
        if self.kind == "prefix":
            lengths = prefix_schedule(confidences, sps, active)
        else:
            conf_hist, act_hist = inner
            slot = n % self.delay              # holds speculative round (n - delay) until overwritten below
            capacity = zos_capacity(conf_hist[slot], sps, act_hist[slot])
            zos = top_k_lengths(confidences, capacity, sps, active)
            warm = prefix_schedule(confidences, sps, active)   # no history yet: Algorithm 1 with the break
            lengths = jnp.where(n >= self.delay, zos, warm)
            inner = (conf_hist.at[slot].set(jnp.asarray(confidences, jnp.float32)),
                     act_hist.at[slot].set(jnp.asarray(active, bool)))
        return lengths, dict(state, inner=inner, spec_rounds=n + 1)

    def after_round(self, state, committed, lengths, active, sched_args):
        """Folds a verified round into the switch state: ``committed [B]`` tokens per row, ``lengths [B]``,
        ``active [B]`` (the rows that ran it), (sps, plain_sps) -> state."""
        if not self.switch:
            return state
        sps, plain_sps = sched_args
        sps = jnp.asarray(sps, jnp.float32)
        act = jnp.asarray(active, bool)
        live = jnp.sum(act.astype(jnp.int32))
        b = jnp.sum(jnp.where(act, jnp.asarray(lengths, jnp.int32) + 1, 0))
        rate = sps[jnp.clip(b, 1, sps.shape[0] - 1)]
        plain = live.astype(jnp.float32) * jnp.asarray(plain_sps, jnp.float32)
        toks = jnp.sum(jnp.where(act, jnp.asarray(committed, jnp.float32), 0.0))
        ratio = jnp.where(live > 0, state["scale"] * toks * rate / jnp.maximum(plain, 1e-30), 1.0)
        ema = SWITCH_EMA * ratio + (1.0 - SWITCH_EMA) * state["ema"]
        go_off = (ema < 1.0) | (state["off_mode"] & (ema < 1.0 + SWITCH_MARGIN))
        cost = jnp.asarray(plain_sps, jnp.float32) / rate               # this round, in plain steps
        need = jnp.ceil(jnp.clip(cost * (1.0 - ema) / SWITCH_PROBE_BUDGET, 0.0, float(self.off_rounds[1])))
        nxt = state["next_off"]
        run = jnp.clip(jnp.maximum(nxt, need.astype(jnp.int32)), 1, self.off_rounds[1])
        return dict(state, ema=ema, off_mode=go_off, off_left=jnp.where(go_off, run, 0),
                    next_off=jnp.where(go_off, jnp.minimum(2 * nxt, self.off_rounds[1]), self.off_rounds[0]))

    def after_call(self, state: dict, committed, proposed, plain, sched_args, start: dict | None = None,
                   wall: float = 1.0) -> dict:
        """Host side, with ``carry_switch``: a finished static-batch call's :func:`call_ratio` replaces the EMA the loop
        left (``state``: host scalars, :data:`SWITCH_FIELDS`), and the mode follows the same rule as after a round: off
        below 1 (a run that is still going is lengthened to the probe budget below; else a new run, probe-budgeted and
        doubling), on at 1 + margin, held in between. ``start``: the state the call began with; its mode is the one
        held, and its run length doubles (a probing call whose rounds switched speculation back on inside the call reset
        the loop's: without it a draft that loses call after call was probed every other call, demo pair, batch 8). The
        run (a new one, or one the loop left going) is long enough that the next call, which probes, costs at most
        SWITCH_PROBE_BUDGET of it: ``(1 / ratio - 1) * steps / budget``, ``steps`` = the call's longest row. ``wall``:
        multiplies the ratio (the wall-clock correction of the profile's prices, :meth:`_SchedulerBase.wall_factor`). A
        call with no speculative round changes nothing."""
        if not self.switch:
            return state
        sps, plain_sps = sched_args
        got = call_ratio(committed, proposed, plain, sps, plain_sps)
        if got is None:
            return state
        ema, cost = got
        ema *= float(wall)
        was_off, nxt = bool(state["off_mode"]), int(state["next_off"])
        if start is not None:
            was_off, nxt = bool(start["off_mode"]), max(nxt, int(start["next_off"]))
        go_off = ema < 1.0 or (was_off and ema < 1.0 + SWITCH_MARGIN)
        out = dict(state, ema=float(np.float32(ema)), off_mode=go_off)
        if not go_off:
            return dict(out, off_left=0, next_off=self.off_rounds[0])
        # the probe that ends this run is the next call (it starts speculating, and a run inside it costs more per
        # step than dj.generate): it takes steps / ratio plain steps' time for the call's steps, so it loses
        # steps * (1 / ratio - 1) (once priced as steps * (1 - ratio): short by the factor 1 / ratio, 1.47 at the demo
        # pair's batch 8, where full blocks run at 0.68x plain), a call's worth, not one round's (demo pair, batch 32:
        # a round is 2.5 plain steps, a call 96; priced per round, runs of 8-64 steps each ended in a probe call, 13%
        # of row-rounds speculated and the scheduler lost 4-6% to plain)
        steps = max(cost, float(np.asarray(committed).sum(axis=1).max()))
        loss = steps * (1.0 / max(ema, 1e-6) - 1.0)
        need = int(np.ceil(np.clip(loss / SWITCH_PROBE_BUDGET, 0.0, float(self.off_rounds[1]))))
        if int(state["off_left"]) > 0:         # a run the loop started is still going: long enough for that probe
            return dict(out, off_left=max(int(state["off_left"]), need))
        run = int(np.clip(max(nxt, need), 1, self.off_rounds[1]))
        return dict(out, off_left=run, next_off=min(2 * nxt, self.off_rounds[1]))


def call_ratio(committed, proposed, plain, sps, plain_sps) -> tuple[float, float] | None:
    """A finished static-batch call on the profile's prices (host side): ``committed``, ``proposed`` ``[B, rounds]``
    (tokens committed and drafts verified per row-round; a plain step commits 1), ``plain`` ``[B, rounds]`` (plain
    steps). -> (the seconds plain decoding of the call would take, as many steps as its longest row has tokens,
    over the seconds its rounds took, each at SPS(B) for its verified tokens or at the plain step; the mean
    speculative round in plain steps), or None when no round speculated. Unlike the per-round EMA, which the last
    rounds dominate (at the end of a call few rows are live and a round of few verified tokens is cheap, so the
    EMA left by a call that lost could say 1.4: demo pair, batch 32), this weighs every round by its time."""
    seconds, spec, round_s = _priced_rounds(committed, proposed, plain, sps, plain_sps)
    if not spec.any():
        return None
    step_s = 1.0 / float(plain_sps)
    plain_seconds = step_s * float(np.asarray(committed, np.float64).sum(axis=1).max())
    return plain_seconds / seconds, float(round_s[spec].mean() / step_s)


def predicted_call_seconds(committed, proposed, plain, sps, plain_sps) -> float:
    """The seconds a finished call's rounds take on the profile's prices (host side; arguments as in
    :func:`call_ratio`): each speculative round at SPS of its verified tokens, each plain step at the plain step.
    What :meth:`_SchedulerBase.remember_switch_state` sets a call's measured seconds against."""
    return _priced_rounds(committed, proposed, plain, sps, plain_sps)[0]


def _priced_rounds(committed, proposed, plain, sps, plain_sps):
    """-> (seconds of the call's rounds on the profile's prices, [rounds] speculative mask, [rounds] round seconds)."""
    c = np.asarray(committed, np.float64)
    live = c > 0
    rows_live = live.any(axis=0)
    is_plain = (np.asarray(plain, bool) & live).any(axis=0)
    spec = rows_live & ~is_plain
    sps = np.asarray(sps, np.float64)
    b = np.where(live, np.asarray(proposed, np.int64) + 1, 0).sum(axis=0)
    round_s = 1.0 / sps[np.clip(b, 1, sps.shape[0] - 1)]
    step_s = 1.0 / float(plain_sps)
    seconds = float(np.where(spec, round_s, 0.0).sum() + step_s * (rows_live & is_plain).sum())
    return seconds, spec, round_s


def _plain_sps(x) -> float | None:
    if x is None:
        return None
    v = float(x)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"plain_sps must be finite and > 0, got {x!r}")
    return v


def _buckets(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    out = tuple(int(b) for b in x)
    if any(b < 1 for b in out) or list(out) != sorted(set(out)):
        raise ValueError(f"verify_buckets must be increasing positive ints, got {x!r}")
    return out


class _SchedulerBase:
    """Shared by the scheduler dataclasses: table checks, the policy's arguments, construction from a profile."""

    def _check(self):
        object.__setattr__(self, "sps", _sps_tuple(self.sps))
        object.__setattr__(self, "plain_sps", _plain_sps(self.plain_sps))
        object.__setattr__(self, "verify_buckets", _buckets(self.verify_buckets))
        first, longest = (int(x) for x in self.off_rounds)
        if not 1 <= first <= longest:
            raise ValueError(f"off_rounds must be (first, longest) with 1 <= first <= longest, got {self.off_rounds}")
        object.__setattr__(self, "off_rounds", (first, longest))
        object.__setattr__(self, "_switch_memory", {})     # batch -> switch state; not a field: not hashed
        object.__setattr__(self, "_scaled_calls", {})      # batch -> calls whose call_scale was folded in
        # batch -> {"plain"|"loop": [measured / predicted seconds], "loop_since_plain": timed loop calls since}
        object.__setattr__(self, "_wall_prices", {})
        object.__setattr__(self, "_calibrations", {})      # batch -> plain calls granted to time the plain path

    def init_state(self, batch: int, block_size: int):
        return self.policy.init_state(batch, block_size)

    # ---- the switch-off state carried between calls (host side) ----
    def switch_state_for(self, batch: int) -> dict:
        """Where the switch-off rule starts a call of ``batch`` rows: where the last call of that size ended
        (``carry_switch``), else fresh. Values are host scalars."""
        kept = self._switch_memory.get(int(batch)) if self.carry_switch else None
        if kept is not None:
            return dict(kept)
        return {k: v.item() for k, v in self.policy.fresh_switch_state(xp=np).items()}

    def wall_factor(self, batch: int) -> float:
        """How much the profile's prices overstate speculation for calls of ``batch`` rows, from earlier calls' wall
        time: (measured / predicted seconds of plain calls) / (the same of loop calls), each the mean of the faster
        half (:func:`typical_seconds`) of the path's last n calls, n the fewer of the two paths' timed calls (at most
        :data:`WALL_SAMPLES`), clipped to [0.5, 2]. 1 until both kinds of call have been timed, or without
        ``wall_clock``. Equal counts: noise only adds time, so the faster half of more calls is lower, and one plain
        call set against eight loop calls' faster half favoured speculation by about the noise's mean."""
        kept = self._wall_prices.get(int(batch), {}) if self.wall_clock else {}
        if not kept.get("plain") or not kept.get("loop"):
            return 1.0
        n = min(len(kept["plain"]), len(kept["loop"]))
        return float(np.clip(typical_seconds(kept["plain"][-n:]) / typical_seconds(kept["loop"][-n:]), 0.5, 2.0))

    def remember_call_seconds(self, batch: int, path: str, seconds: float, predicted: float) -> None:
        """Folds a call's measured ``seconds`` against the profile's ``predicted`` seconds for its rounds into the
        wall prices of ``path`` ("plain": a whole call of the target's own decode; "loop": the speculative loop).
        Calls that compiled a program must not be passed (their seconds are compile time). Ignored in a run of
        several JAX processes: each would time its own calls, and processes that share a sharded target must all
        take the same path."""
        if path not in ("plain", "loop"):
            raise ValueError(f"path must be 'plain' or 'loop', got {path!r}")
        if not (self.wall_clock and self.carry_switch) or not predicted > 0 or not np.isfinite(seconds):
            return
        if jax.process_count() > 1:
            return
        kept = self._wall_prices.setdefault(int(batch), {})
        samples = kept.setdefault(path, [])
        samples.append(float(seconds / predicted))
        del samples[:-WALL_SAMPLES]
        # timed loop calls since the last timed plain call (the calibration calls' clock)
        kept["loop_since_plain"] = kept.get("loop_since_plain", 0) + 1 if path == "loop" else 0

    def remember_switch_state(self, batch: int, state, call_stats=None, start=None) -> None:
        """Keeps a call's final switch state (a mapping with :data:`SWITCH_FIELDS`) for the next call of
        ``batch`` rows; ``call_stats`` (a static call's per row-round ``accept``, ``proposed``, ``plain``, ``[B,
        rounds]``) folds the call's :func:`call_scale` into it and sets its ratio (times :meth:`wall_factor`) and
        mode by :meth:`SchedulePolicy.after_call` (``start``: the state the call began with), and may owe the next
        call as a plain one to time the plain path (:meth:`_calibration_due`). Decisions it drives come from
        finished rounds and earlier calls only: lossless."""
        if self.carry_switch:
            kept = {k: np.asarray(state[k]).item() for k in SWITCH_FIELDS}
            if call_stats is not None:
                committed = np.asarray(call_stats["accept"])
                kept = self.policy.after_call(kept, committed, np.asarray(call_stats["proposed"]),
                                              np.asarray(call_stats["plain"]), self.host_sched_args, start,
                                              wall=self.wall_factor(batch))
                # the first measured call replaces the neutral start; later ones are averaged in
                w = SCALE_EMA if self._scaled_calls.get(int(batch), 0) else 1.0
                kept["scale"] = float(np.float32(w * call_scale(committed) + (1 - w) * kept["scale"]))
                self._scaled_calls[int(batch)] = self._scaled_calls.get(int(batch), 0) + 1
                if self._calibration_due(batch, kept):
                    kept["off_left"] = 1        # one plain step owed: the next call runs plain (mode unchanged)
            self._switch_memory[int(batch)] = kept

    def _calibration_due(self, batch: int, kept: dict) -> bool:
        """Whether the next call of ``batch`` rows should run plain once, only to time the plain path: with
        ``wall_clock``, speculation on (``kept``: the switch state after the last call) at a ratio below
        :data:`WALL_CALIBRATE_BELOW` (close enough to 1 that the profile's bias or one noisy plain timing could decide
        it), and at least ``WALL_CALIBRATE_AFTER * 2**k`` timed loop calls since the last timed plain call, ``k`` the
        calibration calls granted so far at this size (capped at :data:`WALL_CALIBRATE_MAX_DOUBLINGS`; a granted call
        that compiled is not timed, and the next comes a doubled gap later). No loop call is timed without
        ``wall_clock`` or in a run of several processes (:meth:`remember_call_seconds`). Counts the call it grants."""
        if kept["off_mode"] or kept["off_left"] > 0 or not kept["ema"] < WALL_CALIBRATE_BELOW:
            return False
        granted = self._calibrations.get(int(batch), 0)
        since = self._wall_prices.get(int(batch), {}).get("loop_since_plain", 0)
        if since < WALL_CALIBRATE_AFTER * 2 ** min(granted, WALL_CALIBRATE_MAX_DOUBLINGS):
            return False
        self._calibrations[int(batch)] = granted + 1
        return True

    def forget_switch_state(self) -> None:
        """Drops what earlier calls left (the next call starts fresh)."""
        self._switch_memory.clear()
        self._scaled_calls.clear()
        self._wall_prices.clear()
        self._calibrations.clear()

    @property
    def sched_args(self):
        """The traced arguments of the compiled loop: (sps ``[Bmax+1]``, plain steps per second; 0 = no switch).
        Made once per scheduler (a call pays no transfer for them)."""
        cached = self.__dict__.get("_sched_args")
        if cached is None:
            cached = (jnp.asarray(self.sps, jnp.float32), jnp.float32(self.plain_sps or 0.0))
            object.__setattr__(self, "_sched_args", cached)
        return cached

    @property
    def host_sched_args(self):
        """:attr:`sched_args` as numpy values, for the host-side evaluation of the switch rule."""
        return (np.asarray(self.sps, np.float32), np.float32(self.plain_sps or 0.0))

    def __call__(self, confidences, active, state, round_index=None):
        """``[B, Bs]`` confidences, ``[B]`` active -> (L ``[B]`` int32, state). (``round_index`` is unused: the
        state counts the speculative rounds.)"""
        return self.policy(confidences, active, state, self.sched_args)

    @classmethod
    def from_profile(cls, path, **kw):
        """A scheduler from a ``dspark profile`` JSON: a round profile (``--draft``) gives the round table, the
        plain step (switch-off on) and the verify buckets; an older forward-only table gives the table alone."""
        prof = load_round_profile(path)
        return cls(prof["sps"], plain_sps=prof["plain_sps"], verify_buckets=prof["verify_buckets"], **kw)


@dataclasses.dataclass(frozen=True)
class PrefixScheduler(_SchedulerBase):
    """Algorithm 1 per round on the active rows' (calibrated) confidences. Frozen and hashable.

    ``sps``: rounds (or verify steps) per second by verified-token count, ``[Bmax+1]``; ``plain_sps``: plain
    decoding steps per second on the same engine (given: the loop may switch speculation off, see
    :class:`SchedulePolicy`); ``verify_buckets``: the verify plan of the profile (ragged buckets, padded above),
    used when ``speculative_generate(ragged_verify=None)``. :meth:`from_profile` fills all three. ``off_rounds``:
    the first and the longest plain run of the switch-off rule. ``carry_switch``: a call of
    ``dj.speculative_generate`` starts the switch-off rule where the last call with as many rows ended (its smoothed
    ratio, mode, the plain steps left and the call scale), instead of fresh with speculation on; a call that starts
    with plain steps owed runs the target's own plain decode for all of it (no draft work at all) and the next
    call probes. ``wall_clock`` (with ``carry_switch``): each call's measured seconds are set against what the
    profile predicted for its rounds, per path (whole plain calls, loop calls; calls that compiled left out), and once
    both are timed the call's ratio is corrected by their quotient (:meth:`wall_factor`; where speculation stays on
    near break-even, a call now and then runs plain to time that path, ever further apart,
    :data:`WALL_CALIBRATE_BELOW`): decisions still come from
    earlier calls only (lossless), but depend on the machine's timing. :meth:`forget_switch_state` resets."""

    sps: tuple[float, ...]
    plain_sps: float | None = None
    verify_buckets: tuple[int, ...] | None = None
    off_rounds: tuple[int, int] = (SWITCH_FIRST_OFF, SWITCH_MAX_OFF)
    carry_switch: bool = True
    wall_clock: bool = True

    def __post_init__(self):
        self._check()

    @property
    def policy(self) -> SchedulePolicy:
        return SchedulePolicy("prefix", switch=self.plain_sps is not None, off_rounds=self.off_rounds)


@dataclasses.dataclass(frozen=True)
class ZeroOverheadScheduler(_SchedulerBase):
    """ZOS: capacity from the confidences ``delay`` speculative rounds earlier (global search), top-K current
    pairs. Until ``delay`` rounds of history exist the round uses Algorithm 1 with the break (lossless). Plain
    rounds (switch-off) add no history: the capacity comes from the last speculative rounds. Other fields as in
    :class:`PrefixScheduler` (``carry_switch`` and ``wall_clock`` included)."""

    sps: tuple[float, ...]
    delay: int = 2
    plain_sps: float | None = None
    verify_buckets: tuple[int, ...] | None = None
    off_rounds: tuple[int, int] = (SWITCH_FIRST_OFF, SWITCH_MAX_OFF)
    carry_switch: bool = True
    wall_clock: bool = True

    def __post_init__(self):
        self._check()
        if int(self.delay) < 1:
            raise ValueError(f"delay must be >= 1, got {self.delay}")
        object.__setattr__(self, "delay", int(self.delay))

    @property
    def policy(self) -> SchedulePolicy:
        return SchedulePolicy("zos", self.delay, switch=self.plain_sps is not None, off_rounds=self.off_rounds)


def load_sps(path) -> tuple[float, ...]:
    """The ``sps`` table of a ``dspark profile`` JSON (key ``sps_table``: steps per second of the forward-only
    profile, rounds per second of a round profile) or a JSON list of numbers."""
    return load_round_profile(path)["sps"]


def load_round_profile(path) -> dict:
    """``{sps, plain_sps, verify_buckets, batch}`` of a profile JSON. A round profile (format
    ``dspark-round-v1``) has all four; an older forward-only table (``dspark-sps-v1`` or a bare list) has
    ``plain_sps = verify_buckets = batch = None`` (no switch-off: that table does not price the draft's work)."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    table = obj.get("sps_table") if isinstance(obj, dict) else obj
    if table is None:
        raise ValueError(f"{path}: expected a JSON list or a profile with an 'sps_table' list")
    out = dict(sps=_sps_tuple(table), plain_sps=None, verify_buckets=None, batch=None)
    if isinstance(obj, dict) and obj.get("format") == "dspark-round-v1":
        missing = [k for k in ("plain_sps", "verify_buckets", "batch") if k not in obj]
        if missing:
            raise ValueError(f"{path}: a round profile (dspark-round-v1) without {missing}: write it again with "
                             "`dspark profile --draft`")
        out.update(plain_sps=_plain_sps(obj["plain_sps"]), verify_buckets=_buckets(obj["verify_buckets"]),
                   batch=int(obj["batch"]))
    return out


def expected_throughput(confidences, lengths, sps, active=None) -> jax.Array:
    """Theta = tau * SPS(B) of given lengths (for reports and tests): ``[R, Bs]``, ``[R]``, ``[Bmax+1]`` -> scalar."""
    c = jnp.asarray(confidences, jnp.float32)
    act = jnp.ones((c.shape[0],), bool) if active is None else jnp.asarray(active, bool)
    a = cumulative_acceptance(c)
    j = jnp.arange(c.shape[1])[None, :]
    lengths = jnp.asarray(lengths, jnp.int32)
    tau = jnp.sum(act) + jnp.sum(jnp.where(act[:, None] & (j < lengths[:, None]), a, 0.0))
    b = jnp.sum(jnp.where(act, lengths + 1, 0))
    s = jnp.asarray(sps, jnp.float32)
    return jnp.where(b < s.shape[0], tau * s[jnp.clip(b, 0, s.shape[0] - 1)], -jnp.inf)


Scheduler = PrefixScheduler | ZeroOverheadScheduler

__all__ = ["SchedulePolicy", "prefix_schedule", "zos_schedule", "zos_capacity", "top_k_lengths",
           "cumulative_acceptance", "check_confidences", "check_sps", "PrefixScheduler", "ZeroOverheadScheduler",
           "load_sps", "load_round_profile", "expected_throughput", "Scheduler", "SWITCH_FIELDS",
           "call_scale", "call_ratio"]
