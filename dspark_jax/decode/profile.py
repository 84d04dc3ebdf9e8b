"""Throughput profile SPS(B) of a target (spec §6.4): verify steps per second when one step verifies B tokens.

What a step is. The prefix scheduler counts every verified token of the batch, anchors included, as B. In an
engine whose verify forward runs on a flattened, ragged token batch each token attends to its own request's
context; here a step is one jitted target forward over ``[B, 1]`` (B rows, one new token each) on a KV cache
holding ``context`` tokens per row, with the logits of every token (verification needs all of them). That costs
what a ragged step over B tokens costs: the weights are read once, the matmuls grow with B, attention with
B x context.

Each B is compiled, run ``warmup`` times, then timed ``repeats`` times (``block_until_ready``); the mean of the
faster half of the times is kept (:func:`typical_seconds`). :func:`sps_table` turns the measured points into the
dense table ``[Bmax+1]`` the schedulers read. By default (``shape="convex"``) the step time is the lower convex hull
of the measured (B, seconds) points, made non-decreasing: with a convex, non-decreasing step time t(B), Theta = tau /
t is unimodal along Algorithm 1's sorted order (tau is concave: its increments a are sorted descending), so the
lossless break stops exactly at the best prefix, and the top-k prefix is the best choice of k drafts: the scheduler
is then optimal over all length vectors for that cost model. Raw points are jagged (timing noise on small machines,
shape-dependent kernels): a dip makes the break stop early. ``shape="monotone"`` (running maximum of the interpolated
times) and ``"raw"`` (plain interpolation) are kept for comparison; ZOS's global search copes with any of them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dspark_jax.cache import round_capacity
from dspark_jax.convert.deepspec import load_draft
from dspark_jax.convert.hf import load_target
from dspark_jax.decode.autoregressive import _decodes_flat, decode_steps, generate_capacity
from dspark_jax.decode.prefill import prefill as prefill_target
from dspark_jax.decode.ragged import ragged_buckets
from dspark_jax.decode.sampling import SamplingConfig, request_keys
from dspark_jax.decode.scheduler import SchedulePolicy, typical_seconds
from dspark_jax.decode.spec_loop import (
    SpecSettings,
    drafts_per_round,
    head_for_loop,
    init_rows,
    loop_state,
    plain_run,
    spec_round,
)
from dspark_jax.nn.static_graph import split_static

# how much faster than the padded forward a ragged bucket's round must be for the verify plan to keep it
RAGGED_MARGIN = 0.05


def default_token_counts(max_tokens: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and the midpoints between them) up to ``max_tokens``."""
    out, p = [], 1
    while p <= max_tokens:
        out.append(p)
        mid = p + p // 2
        if p >= 2 and mid <= max_tokens:
            out.append(mid)
        p *= 2
    if out[-1] != max_tokens:
        out.append(max_tokens)
    return sorted(set(out))


def measure_sps(target, token_counts: Sequence[int], *, context: int = 128, warmup: int = 2, repeats: int = 5,
                seed: int = 0, progress: bool = False, log=None) -> list[dict[str, Any]]:
    """Times one verify step per B in ``token_counts``. Returns ``[{tokens, seconds (typical_seconds), seconds_all,
    sps, compile_seconds}]`` in the order given."""
    counts = [int(b) for b in token_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"token counts must be >= 1, got {list(token_counts)}")
    if context < 0 or warmup < 0 or repeats < 1:
        raise ValueError("context and warmup must be >= 0 and repeats >= 1")
    limit = target.config.max_position_embeddings
    if context + 1 > limit:
        raise ValueError(f"context {context} + 1 exceeds the target's max_position_embeddings={limit}")
    graph, state = nnx.split(target)

    @jax.jit
    def step(state, ids, cache):
        model = nnx.merge(graph, state)
        out = model(ids, cache, num_new=jnp.ones((ids.shape[0],), jnp.int32))
        return out.logits, out.cache.lengths

    rng = np.random.default_rng(seed)
    results = []
    bar = None
    if progress:
        bar = tqdm(total=len(counts), desc="profile", unit="B", file=sys.stderr)
    for b in counts:
        cache = target.init_cache(b, context + 8)
        cache = cache.with_lengths(jnp.full((b,), context, jnp.int32))   # the cost of attending to `context` keys
        ids = jnp.asarray(rng.integers(0, target.config.vocab_size, (b, 1)), jnp.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, ids, cache))
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            jax.block_until_ready(step(state, ids, cache))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, ids, cache))
            times.append(time.perf_counter() - t0)
        med = typical_seconds(times)
        results.append({"tokens": b, "seconds": med, "seconds_all": times, "sps": 1.0 / med,
                        "compile_seconds": compile_s})
        if log is not None:
            log(f"[profile] B={b}: {1e3 * med:.2f} ms/step = {1.0 / med:.1f} steps/s")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            # drop a when it lies on or above the segment o -> i
            if (x[a] - x[o]) * (y[i] - y[o]) - (y[a] - y[o]) * (x[i] - x[o]) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return x[hull], y[hull]


SHAPES = ("convex", "monotone", "raw")


def sps_table(measured: Sequence[dict[str, Any]], bmax: int | None = None, shape: str = "convex") -> list[float]:
    """Dense ``[Bmax+1]`` steps-per-second table from measured points (``tokens``, ``seconds``).

    Step time is interpolated linearly in B (flat below the smallest measured B) through the measured points
    (``raw``), their running maximum (``monotone``), or the lower convex hull of the points, then its running
    maximum (``convex``, the default: see the module docstring). ``bmax`` defaults to the largest measured B
    and may not exceed it (no extrapolation). Entry 0 repeats entry 1 (never read: a step verifies >= 1 token)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    pts = sorted((int(m["tokens"]), float(m["seconds"])) for m in measured)
    if not pts:
        raise ValueError("no measured points")
    bs = np.array([p[0] for p in pts], np.float64)
    secs = np.array([p[1] for p in pts], np.float64)
    if (secs <= 0).any() or not np.isfinite(secs).all():
        raise ValueError("measured step times must be finite and > 0")
    top = int(bs[-1]) if bmax is None else int(bmax)
    if top > bs[-1]:
        raise ValueError(f"bmax={top} exceeds the largest measured B={int(bs[-1])}: measure up to it")
    if top < 1:
        raise ValueError(f"bmax must be >= 1, got {top}")
    grid = np.arange(1, top + 1, dtype=np.float64)
    if shape == "convex":
        bs, secs = _lower_hull(bs, secs)
    t = np.interp(grid, bs, secs)
    if shape != "raw":
        t = np.maximum.accumulate(t)
    table = 1.0 / t
    return [float(table[0])] + [float(x) for x in table]


def profile_target(target, token_counts: Sequence[int], *, context: int = 128, warmup: int = 2, repeats: int = 5,
                   seed: int = 0, progress: bool = False, log=None) -> dict[str, Any]:
    """Measures and returns the JSON-ready profile (measured points, monotone and raw tables, device)."""
    measured = measure_sps(target, token_counts, context=context, warmup=warmup, repeats=repeats, seed=seed,
                           progress=progress, log=log)
    cfg = target.config
    return {
        "format": "dspark-sps-v1",
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "model": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                  "vocab_size": cfg.vocab_size, "dtype": str(getattr(target, "dtype", ""))},
        "context": context, "warmup": warmup, "repeats": repeats,
        "step": "target forward over [B, 1] new tokens with a KV cache of `context` tokens per row, logits for all",
        "measured": measured,
        "sps_table": sps_table(measured, shape="convex"),
        "sps_table_monotone": sps_table(measured, shape="monotone"),
        "sps_table_raw": sps_table(measured, shape="raw"),
    }


def spread_lengths(batch: int, tokens: int, block_size: int) -> np.ndarray:
    """Per-row proposal lengths ``[batch]`` whose round verifies ``tokens`` tokens (anchors included), spread
    evenly over the rows (each in ``0..block_size``)."""
    drafts = int(tokens) - batch
    if drafts < 0 or drafts > batch * block_size:
        raise ValueError(f"{tokens} verified tokens do not fit {batch} rows of 1..{block_size + 1}")
    return (drafts // batch + (np.arange(batch) < drafts % batch)).astype(np.int32)


def profile_rounds(target, draft, batch: int, *, context: int = 128, warmup: int = 2, repeats: int = 5,
                   rounds: int = 8, temperature: float = 0.0, seed: int = 0, prompt_width: int | None = None,
                   max_new_tokens: int | None = None, log=None) -> dict[str, Any]:
    """Round profile of the engine that will run (issue 32): the static loop's own round code
    (decode/spec_loop.py) for ``batch`` rows on a ``context``-token KV cache, timed over ``rounds`` rounds per call
    (:func:`typical_seconds` of ``repeats`` calls, per round):

    - a draft-verify round (proposal, scheduler, verify, rejection sampling, commit) for each verify branch: every
      ragged bucket ``cap`` (lengths forced so the round verifies ``cap`` tokens) and the padded ``[B, Bs+1]``
      forward (full blocks);
    - a plain decoding step: ``rounds`` steps of the target's own plain decode (``dj.generate``'s loop,
      :func:`~dspark_jax.decode.autoregressive.decode_steps`), what a call runs once the switch has turned
      speculation off for all of it (``carry_switch``), per step; and, for reference, a plain run of the
      speculative loop (taps buffered, the draft's catch-up on their context included), per step.

    The verify plan keeps the ragged buckets below ``batch * (Bs + 1)``, smallest first, while they beat the padded
    forward by :data:`RAGGED_MARGIN`; above them the padded forward runs, so no round verifies slower than padded at
    the same lengths. ``sps_table`` (rounds per
    second by verified tokens B, anchors included) is the lower convex hull of the plan's step times (see
    :func:`sps_table`); ``plain_sps`` is the target's plain decode steps per second (``plain_run_seconds``: the
    loop's plain run per step). Returns the JSON-ready profile.

    ``prompt_width`` and ``max_new_tokens`` (both or neither): the calls the profile prices (padded prompt width,
    new tokens). Each step attends over its whole cache, so the rounds are then timed on a cache of as many slots as
    ``speculative_generate`` gives such a call and the plain step on one of ``dj.generate``'s (demo pair: 176 and
    160 slots; 16 more slots cost 5-14% a step here); without them both use the profile's own (smallest) cache."""
    if not draft.supports_plain_runs:
        raise ValueError(f"a round profile needs a DSpark / DFlash draft (the schedulers drive block drafts), got "
                         f"{type(draft).__name__}")
    if batch < 1 or context < 1 or rounds < 1 or warmup < 0 or repeats < 1:
        raise ValueError("batch, context, rounds and repeats must be >= 1 and warmup >= 0")
    bs = drafts_per_round(draft.config)
    width = bs + 1
    full = batch * width
    max_new = rounds * width + width + 2                 # no row finishes within a timed call
    if context + max_new + width + 2 > target.config.max_position_embeddings:
        raise ValueError(f"context {context} + {max_new} round tokens exceed the target's max_position_embeddings")
    capacity = round_capacity(context + max_new + width + 2)   # as the loop rounds its own (cache.round_capacity)
    plain_capacity = capacity
    if (prompt_width is None) != (max_new_tokens is None):
        raise ValueError("give prompt_width and max_new_tokens together (the calls to price), or neither")
    if prompt_width is not None:
        if prompt_width < 1 or max_new_tokens < 1:
            raise ValueError(f"prompt_width and max_new_tokens must be >= 1, got {prompt_width}, {max_new_tokens}")
        # the caches the calls will have (speculative.py's and autoregressive.generate_capacity), at least the room
        # the timed rounds need
        capacity = max(capacity, round_capacity(prompt_width + max_new_tokens + bs + 2))
        plain_capacity = max(round_capacity(context + rounds + 1), generate_capacity(prompt_width, max_new_tokens))
    can_flatten = hasattr(target, "forward_flat")
    buckets = ragged_buckets(batch, width) if can_flatten else ()
    settings = SpecSettings(max_new, SamplingConfig(float(temperature)), (), 0.0, capacity, capacity,
                            SchedulePolicy("prefix", switch=True), buckets, True)
    graphs = (*split_static(target), *split_static(draft))
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, target.config.vocab_size, (batch, context)), jnp.int32)
    sched_args = (jnp.ones((full + 1,), jnp.float32), jnp.float32(1.0))
    conf_temps = jnp.ones((bs,), jnp.float32) if draft.config.has_confidence else None

    @functools.partial(jax.jit, static_argnames=("t_graph", "d_graph"))
    def init(t_graph, t_state, d_graph, d_state, ids):
        tgt, drf = t_graph.merge(t_state), d_graph.merge(d_state)
        keys = request_keys(jax.random.key(seed), jnp.arange(batch, dtype=jnp.int32))
        rows = init_rows(tgt, drf, ids, jnp.full((batch,), context, jnp.int32), keys, settings)
        return loop_state(rows, settings, bs)

    @functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "plain"))
    def run(t_graph, t_state, d_graph, d_state, c, lengths, branch, *, plain):
        tgt, drf = t_graph.merge(t_state), d_graph.merge(d_state)
        head_hv = head_for_loop(drf)

        if plain:         # one plain run of `rounds` steps, as the loop runs them (draft catch-up included)
            return plain_run(tgt, drf, c, settings, jnp.int32(rounds))

        def body(_, c):   # the loop's whole round: the switch's plain-run check and guards included
            return spec_round(tgt, drf, c, settings, sched_args, conf_temps, head_hv, forced_lengths=lengths,
                              verify_branch=branch)

        return jax.lax.fori_loop(0, rounds, body, c)

    flat = _decodes_flat(target)

    @functools.partial(jax.jit, static_argnames=("t_graph",))
    def plain_cache(t_graph, t_state, ids):
        return prefill_target(t_graph.merge(t_state), ids, jnp.full((batch,), context, jnp.int32), plain_capacity).cache

    @functools.partial(jax.jit, static_argnames=("t_graph",))
    def plain_decode(t_graph, t_state, c, cache):  # `rounds` steps of the target's own plain decode (dj.generate's)
        tgt = t_graph.merge(t_state)
        out = jnp.full((batch, rounds + 1), -1, jnp.int32).at[:, 0].set(c["anchor"])
        no_stop = jnp.asarray((-2,), jnp.int32)
        return decode_steps(tgt, c["anchor"], cache, out, jnp.zeros((batch,), bool), c["keys"],
                            jnp.int32(1), rounds + 1, settings.sampling, no_stop, flat)

    c0 = init(graphs[0], graphs[1], graphs[2], graphs[3], ids)

    # every branch is compiled first, then timed round-robin (repeat i of each branch back to back), so a burst of
    # load on a shared machine hits all branches alike instead of one
    branches = [(spread_lengths(batch, cap, bs), i, False) for i, cap in enumerate(buckets)]
    branches += [(np.full((batch,), bs), len(buckets), False), (np.zeros((batch,)), 0, True)]
    calls = [functools.partial(run, *graphs, c0, jnp.asarray(ln, jnp.int32), jnp.int32(br), plain=pl)
             for ln, br, pl in branches]
    calls.append(functools.partial(plain_decode, graphs[0], graphs[1], c0, plain_cache(graphs[0], graphs[1], ids)))
    branches.append((None, 0, True))
    compile_s = []
    for fn, (_, _, pl) in zip(calls, branches):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        compile_s.append(time.perf_counter() - t0)
        if not pl and np.asarray(out["stats"]["plain"]).any():   # sched_args keep the switch on: never expected
            raise RuntimeError("round profile: the switch ran plain steps inside a timed speculative branch")
    for _ in range(warmup):
        for fn in calls:
            jax.block_until_ready(fn())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for k, fn in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append((time.perf_counter() - t0) / rounds)
    med = [typical_seconds(t) for t in times]
    measured = [{"branch": "ragged", "tokens": cap, "seconds": med[i], "seconds_all": times[i],
                 "compile_seconds": compile_s[i]} for i, cap in enumerate(buckets)]
    padded = {"branch": "padded", "tokens": full, "seconds": med[-3], "seconds_all": times[-3],
              "compile_seconds": compile_s[-3]}
    measured.append(padded)
    run_s, run_all = med[-2], times[-2]
    plain_s, plain_all = med[-1], times[-1]
    if log is not None:
        log(f"[profile] batch {batch}: rounds " + ", ".join(f"{m['branch']} {m['tokens']}: {1e3 * m['seconds']:.2f}"
                                                            for m in measured)
            + f" ms; plain step {1e3 * plain_s:.2f} ms (in the loop's plain run {1e3 * run_s:.2f})")
    plan = []
    for m in measured[:-1]:                                   # ragged buckets, smallest first, while they win
        # by a margin: a bucket within noise of the padded forward lost in the loop (oracle pair, batch 32: ragged
        # 160 38.95 vs padded 40.11 ms in the profile, the prefix schedule at full blocks' lengths 0.89-0.95x of full
        # blocks' padded rounds). The full-token bucket is timed but never planned: it verifies what the padded
        # forward does, plus the ragged layout, so a profile that says it wins measured noise (oracle pair, batch 32:
        # 48.0 vs 52.1 ms, past the margin; threshold / prefix / ZOS on that plan 0.95-0.96x of full blocks)
        if m["tokens"] >= full or m["seconds"] >= (1.0 - RAGGED_MARGIN) * padded["seconds"]:
            break
        plan.append(m)
    points = [{"tokens": m["tokens"], "seconds": m["seconds"]} for m in plan]
    if not plan or plan[-1]["tokens"] < full:
        points.append({"tokens": full, "seconds": padded["seconds"]})
    caps = [p["tokens"] for p in points]
    step = [points[int(np.searchsorted(caps, b))]["seconds"] for b in range(1, full + 1)]
    cfg = target.config
    return {
        "format": "dspark-round-v1",
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "model": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                  "vocab_size": cfg.vocab_size, "dtype": str(getattr(target, "dtype", ""))},
        "batch": batch, "block_size": bs, "context": context, "cache_slots": capacity,
        "plain_cache_slots": plain_capacity, "prompt_width": prompt_width, "max_new_tokens": max_new_tokens,
        "rounds_per_call": rounds, "warmup": warmup,
        "repeats": repeats, "temperature": float(temperature),
        "step": "one round of the decode loop (proposal, scheduler, verify of B tokens, commit) per verify branch; "
                "plain: one step of the target's plain decode (plain_run_seconds: one step of the loop's plain run)",
        "measured": measured,
        "plain_seconds": plain_s, "plain_seconds_all": plain_all, "plain_sps": 1.0 / plain_s,
        "plain_run_seconds": run_s, "plain_run_seconds_all": run_all,
        "verify_buckets": [m["tokens"] for m in plan],
        "sps_table": sps_table(points, bmax=full, shape="convex"),
        "sps_table_raw": [1.0 / step[0]] + [1.0 / t for t in step],
    }


def save_profile(profile: dict[str, Any], path: str, plot: bool = True, log=print) -> tuple[str, str | None]:
    """Writes the JSON and, when matplotlib is importable, a PNG beside it (same stem)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=2)
    png = None
    if plot:
        png = plot_profile(profile, os.path.splitext(path)[0] + ".png", log=log)
    return path, png


def plot_profile(profile: dict[str, Any], path: str, log=print) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[profile] matplotlib is not installed: skipping the plot (pip install 'dspark_jax[plot]')")
        return None
    m = profile["measured"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    b = [p["tokens"] for p in m]
    ax[0].plot(b, [1.0 / p["seconds"] for p in m], "o", label="measured")
    ax[0].plot(range(1, len(profile["sps_table"])), profile["sps_table"][1:], "-", lw=1, label="table (convex)")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("verified tokens per step B")
    ax[0].set_ylabel("steps / s")
    ax[0].legend()
    ax[1].plot(b, [p["tokens"] / p["seconds"] for p in m], "o-")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("verified tokens per step B")
    ax[1].set_ylabel("verified tokens / s")
    fig.suptitle(f"SPS profile ({profile['backend']}, {profile['device']}, context {profile['context']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_profile(args) -> int:
    """Measures what the schedulers need: with --draft, whole decode rounds of the engine (--batch rows) per
    verified-token count and the plain step; without, the target's verify steps/second SPS(B) alone."""
    if args.tokens:
        try:
            counts = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
        except ValueError:
            raise SystemExit(f"error: --tokens must be comma-separated integers, got {args.tokens!r}") from None
    else:
        counts = default_token_counts(args.max_tokens)
    target = load_target(args.target, dtype=args.dtype)
    try:
        if args.draft:
            draft = load_draft(args.draft, target=target)
            prof = profile_rounds(target, draft, args.batch, context=args.context, warmup=args.warmup,
                                  repeats=args.repeats, temperature=args.temperature, seed=args.seed,
                                  prompt_width=args.prompt_width, max_new_tokens=args.max_new_tokens, log=print)
        else:
            prof = profile_target(target, counts, context=args.context, warmup=args.warmup, repeats=args.repeats,
                                  seed=args.seed, progress=not args.no_progress, log=print)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    if jax.process_index() != 0:  # every process measures its own devices; process 0's table is written
        return 0
    prof["target"] = os.path.abspath(args.target)
    path, png = save_profile(prof, args.out, plot=not args.no_plot)
    if args.draft:
        prof["draft"] = os.path.abspath(args.draft)
        print("| round | verified tokens | ms |\n|---|---:|---:|")
        for p in prof["measured"]:
            print(f"| {p['branch']} | {p['tokens']} | {1e3 * p['seconds']:.2f} |")
        print(f"| plain step | {args.batch} | {1e3 * prof['plain_seconds']:.2f} |")
        print(f"[profile] verify plan: ragged buckets {prof['verify_buckets']}, padded above; wrote {path}"
              + (f" and {png}" if png else "") + f"; use it with PrefixScheduler.from_profile({path!r})")
        return 0
    print("| B | ms/step | steps/s | tokens/s |\n|---:|---:|---:|---:|")
    for p in prof["measured"]:
        print(f"| {p['tokens']} | {1e3 * p['seconds']:.2f} | {p['sps']:.1f} | {p['tokens'] * p['sps']:.0f} |")
    print(f"[profile] wrote {path}" + (f" and {png}" if png else "") +
          f"; use it with PrefixScheduler(load_sps({path!r}))")
    return 0


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure the target's verify steps/second SPS(B) (scheduler input)",
                       description=cmd_profile.__doc__)
    p.add_argument("--target", required=True, help="HF target directory")
    p.add_argument("--draft", default=None, help="draft directory: profile whole rounds of the decode loop for "
                                                  "--batch rows (verify branches + plain step; what the schedulers "
                                                  "use). Without it: the target's forward alone (older table)")
    p.add_argument("--batch", type=int, default=8, help="rows of the engine (with --draft; default 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling of the profiled rounds (with --draft)")
    p.add_argument("--prompt-width", type=int, default=None,
                   help="with --draft and --max-new-tokens: the padded prompt width of the calls to price (their "
                        "caches' slots; default: the profile's own cache)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="with --draft and --prompt-width: the new tokens of the calls to price")
    p.add_argument("--tokens", default=None, help="comma-separated B values (default: 1,2,3,4,6,8,... up to "
                                                   "--max-tokens)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest B when --tokens is not given (default 512)")
    p.add_argument("--context", type=int, default=128, help="KV-cache tokens per row attended by each token")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="sps_profile.json", help="JSON path (a PNG goes beside it)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_profile)


__all__ = ["default_token_counts", "measure_sps", "sps_table", "profile_target", "profile_rounds", "spread_lengths",
           "save_profile", "plot_profile", "cmd_profile", "add_profile_parser"]
