"""``dj.speculative_generate``: the jitted, batched draft-verify loop (spec §4), one ``lax.while_loop`` over rounds
(decode/spec_loop.py) for the whole batch with no host round trip per round; or, with ``max_slots``, the prompts
as a queue over a fixed number of refilled slots (decode/spec_slots.py).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.cache import round_capacity
from dspark_jax.config import next_bucket
from dspark_jax.decode.autoregressive import _decodes_flat, _generate_jit, generate_capacity
from dspark_jax.decode.metrics import round_counts, summarize
from dspark_jax.decode.output import GenerationOutput
from dspark_jax.decode.prompts import check_request_ids, encode_prompts, pad_batch
from dspark_jax.decode.ragged import ragged_buckets
from dspark_jax.decode.sampling import SamplingConfig, request_keys
from dspark_jax.decode.scheduler import (
    SWITCH_FIELDS,
    PrefixScheduler,
    ZeroOverheadScheduler,
    check_sps,
    predicted_call_seconds,
)
from dspark_jax.decode.spec_loop import (
    SpecSettings,
    draft_context_len,
    drafts_per_round,
    head_for_loop,
    init_rows,
    loop_state,
    spec_round,
)
from dspark_jax.decode.spec_slots import SpecSlotEngine
from dspark_jax.drafts.temperatures import resolve_temperatures
from dspark_jax.nn.static_graph import split_static


def speculative_generate(target, draft, prompts, max_new_tokens: int = 256, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, threshold: float = 0.0, scheduler=None,
                         stop_token_ids: Sequence[int] | None = None, seed: int = 0,
                         calibration=None, ragged_verify: bool | None = None, max_slots: int | None = None,
                         refill_at: int | None = None, request_ids: Sequence[int] | None = None,
                         shrink: bool = False) -> GenerationOutput:
    """Speculative decoding with a DSpark / DFlash / Eagle3 draft; lossless w.r.t. the (warped) target distribution.

    Args:
      target, draft: a target (``dj.load_target``) and a draft built for it (``dj.build_draft`` / ``dj.load_draft``).
      prompts: list of token-id lists (or strings when the target has a tokenizer).
      temperature, top_k, top_p: sampling, applied identically to target and draft (0 = greedy).
      threshold: confidence threshold theta: a row verifies the drafts before the first position whose
        confidence sigmoid(c_k / T_k) < theta (0 = always the full block). Needs a confidence head when > 0.
      scheduler: None, or a :class:`~dspark_jax.decode.scheduler.PrefixScheduler` (Algorithm 1) /
        :class:`~dspark_jax.decode.scheduler.ZeroOverheadScheduler`: per round it maps the active rows'
        confidences ``sigmoid(c / T)`` ``[B, Bs]`` to per-row lengths L (0 = the row verifies only its anchor,
        a plain decoding step). Lossless: L depends only on draft-side information. Needs a confidence head;
        exclusive with ``threshold > 0``. Its SPS table must cover the batch's anchors (>= B + 1 entries).
        With ``plain_sps`` (a round profile) it may switch speculation off for a while; it then carries that
        state to its next call of the same batch size, and a call that starts with plain steps owed runs the
        target's plain decode with no draft work (``carry_switch``; docs/SCHEDULING.md §8).
      stop_token_ids: a row stops once one of these is committed; None = the target config's eos ids.
      seed: PRNG seed.
      calibration: STS temperatures T_k applied to the confidence logits (``sigmoid(c_k / T_k)``) before the
        threshold / scheduler and in the recorded confidences. None = the draft's ``sts_temperatures``
        attribute when set (``dj.load_draft`` sets it from ``sts_temperatures.json`` in the draft directory),
        else none; False = raw confidences; or a sequence of Bs floats, or a path to such a JSON file / to a
        draft directory holding one (see :mod:`dspark_jax.decode.calibrate`).
      ragged_verify: True = the target verifies a flattened batch of exactly the ``sum(L + 1)`` chosen tokens,
        padded only up to the next static bucket (:mod:`dspark_jax.decode.ragged`), so verification costs what
        the threshold / scheduler chose instead of ``B * (Bs+1)`` tokens; False = the padded forward. A sequence
        of bucket sizes = a verify plan (what a round profile measured to beat the padded forward): each round
        runs the smallest of them that holds its tokens, and the padded forward above the largest (``()`` =
        always padded). None (default) = the scheduler's ``verify_buckets`` when it came from a round profile;
        else ragged when proposal lengths vary (a threshold or a scheduler), the batch has more than one row (at
        batch 1 the bucket switch costs more than it saves: measured on CPU) and the target supports it.
        Same output either way.
      max_slots: None = all prompts in one static batch; an int = at most that many rows decode at once and the
        prompts form a queue: a finished row's slot takes the next prompt (continuous batching,
        decode/spec_slots.py). A threshold or scheduler then sees the slots as its batch.
      refill_at: with ``max_slots``: hand back to the host to refill once this many slots are free (default
        ``max(1, max_slots // 8)``).
      request_ids: one int per prompt, folded into its sampling key (default: its index): each prompt's tokens
        depend on the seed and its id only, whatever else is batched with it (and with or without ``max_slots``).
      shrink: with ``max_slots``: once the queue is empty, pack the live rows into half as many slots each time
        half are free (decode/slots.py's drain policy; one compile per halving).
    Returns:
      :class:`GenerationOutput` with tokens ``[B, max_new_tokens]`` (-1 padded), lengths, accept_lengths
      ``[B, rounds]`` (m+1 per round; m for a terminal stop round; 0 where a row had no round),
      proposal_lengths ``[B, rounds]``, and stats (tau, rounds, accept_rate@k, tokens/s, ...). Per round,
      ``stats['_round_confidence']`` ``[B, rounds, Bs]`` holds the (calibrated) confidences the loop used,
      ``stats['_round_confidence_logits']`` the raw logits (what calibration fits), ``stats['_round_outcome']``
      the per-position accepted flags.
    """
    rows = encode_prompts(prompts, getattr(target, "tokenizer", None), target.config.vocab_size)
    req = check_request_ids(request_ids, len(rows))
    ids, lengths = pad_batch(rows)
    if max_slots is not None and (not isinstance(max_slots, (int, np.integer)) or max_slots < 1):
        raise ValueError(f"max_slots must be a positive int, got {max_slots!r}")
    batch = ids.shape[0] if max_slots is None else min(int(max_slots), len(rows))
    settings, sched_sps, conf_temps = _spec_setup(
        target, draft, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        threshold=threshold, scheduler=scheduler, stop_token_ids=stop_token_ids, calibration=calibration,
        ragged_verify=ragged_verify, batch=batch, prompt_width=ids.shape[1])
    if max_slots is not None:
        return _generate_slots(target, draft, rows, req, settings, seed, batch, refill_at, sched_sps, conf_temps,
                               prompts, shrink)
    switching = scheduler is not None and settings.scheduler.switch
    switch0 = scheduler.switch_state_for(batch) if switching else None
    policy = settings.scheduler
    if switching and int(policy.plain_steps(switch0, scheduler.host_sched_args, np.ones((batch,), bool), xp=np,
                                            chunk=None)) > 0:
        # the switch-off rule owes plain steps when the call starts: the whole call runs as the target's own plain
        # decode, without the draft's context passes (the run is rounded up to the call: a plain run inside the
        # loop costs more per step, demo pair batch 8: 2.68 vs 2.42 ms in the round profile), and the next call
        # probes. Decided from earlier calls' rounds: lossless
        programs = _programs(_generate_jit)
        res, seconds, steps = _plain_call(target, ids, lengths, req, seed, settings, drafts_per_round(draft.config))
        if programs is not None and _programs(_generate_jit) == programs:   # a call that compiled is not a price
            scheduler.remember_call_seconds(batch, "plain", seconds, _predicted(scheduler, res["stats"]))
        scheduler.remember_switch_state(batch, policy.after_plain(switch0, steps, xp=np))
        return _to_output(res, settings, seconds, target, prompts)
    t_graph, t_state = split_static(target)
    d_graph, d_state = split_static(draft)
    programs = _programs(_spec_jit)
    t0 = time.perf_counter()
    res = _spec_jit(t_graph, t_state, d_graph, d_state, np.asarray(ids, np.int32), np.asarray(lengths, np.int32),
                    jax.random.key(seed), np.asarray(req, np.int32), sched_sps, conf_temps, switch0, settings=settings)
    res = jax.device_get(res)
    seconds = time.perf_counter() - t0
    if switching:
        if programs is not None and _programs(_spec_jit) == programs:
            scheduler.remember_call_seconds(batch, "loop", seconds, _predicted(scheduler, res["stats"]))
        scheduler.remember_switch_state(batch, res["switch"], res["stats"], switch0)
    return _to_output(res, settings, seconds, target, prompts)


def _programs(jitted) -> int | None:
    """How many programs a jitted function holds (None where jax does not say: then no call is timed)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else None


def _predicted(scheduler, stats) -> float:
    """The seconds a finished call's rounds take on the scheduler's profile."""
    return predicted_call_seconds(stats["accept"], stats["proposed"], stats["plain"], *scheduler.host_sched_args)


def _plain_call(target, ids, lengths, req, seed, settings: SpecSettings, bs: int):
    """A whole call as plain decoding (``dj.generate``'s loop) -> (the loop's result dict with every row-round
    recorded as a plain step, seconds, plain steps run). The draft saw nothing: its context is all pending."""
    t_graph, t_state = split_static(target)
    t0 = time.perf_counter()
    out, n_new, steps = _generate_jit(t_graph, t_state, np.asarray(ids, np.int32), np.asarray(lengths, np.int32),
                                      jax.random.key(seed), np.asarray(req, np.int32),
                                      max_new_tokens=settings.max_new_tokens,
                                      capacity=generate_capacity(ids.shape[1], settings.max_new_tokens),
                                      sampling=settings.sampling,
                                      stop_ids=settings.stop_ids, flat_decode=_decodes_flat(target))
    out, n_new, steps = jax.device_get((out, n_new, steps))
    seconds = time.perf_counter() - t0
    n_new = np.asarray(n_new, np.int32)
    batch, rounds = out.shape[0], max(int(steps) - 1, 0)
    ran = np.arange(max(rounds, 1))[None, :] < (n_new - 1)[:, None]
    zeros = np.zeros((batch, max(rounds, 1), bs), np.float32)
    stats = dict(accept=ran.astype(np.int32), proposed=np.zeros(ran.shape, np.int32), conf=zeros,
                 conf_logits=zeros, outcome=zeros.astype(bool), plain=ran)
    start = np.asarray(lengths, np.int32) + n_new - 1
    res = dict(out=np.asarray(out), n_out=n_new, rounds=rounds, stats=stats, t_len=start,
               d_len=np.zeros_like(start), pend_count=start, prompt_len=np.asarray(lengths, np.int32))
    return res, seconds, rounds


def _spec_setup(target, draft, *, max_new_tokens, temperature, top_k, top_p, threshold, scheduler, stop_token_ids,
                calibration, ragged_verify, batch: int, prompt_width: int):
    """Validated arguments of :func:`speculative_generate` -> (SpecSettings, SPS table, STS temperatures) for a
    batch of ``batch`` rows (static loop) or slots, prompts padded to ``prompt_width``."""
    if scheduler is not None and not isinstance(scheduler, (PrefixScheduler, ZeroOverheadScheduler)):
        raise ValueError(f"scheduler must be None, a PrefixScheduler or a ZeroOverheadScheduler "
                         f"(dspark_jax.decode.scheduler), got {type(scheduler).__name__}")
    _check_pair(target, draft)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if threshold < 0 or threshold > 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if threshold > 0 and not draft.config.has_confidence:
        raise ValueError("threshold > 0 needs a draft with a confidence head")
    if scheduler is not None and not draft.config.has_confidence:
        raise ValueError("a scheduler needs a draft with a confidence head (this draft has none: DFlash / Eagle3 "
                         "drafts propose full blocks; use threshold=0 and scheduler=None)")
    if scheduler is not None and threshold > 0:
        raise ValueError("pass either threshold > 0 or a scheduler, not both")
    temps = resolve_temperatures(calibration, draft)
    if temps is not None and not draft.config.has_confidence:
        raise ValueError("calibration temperatures given, but the draft has no confidence head")
    if temps is not None and len(temps) != drafts_per_round(draft.config):
        raise ValueError(f"calibration has {len(temps)} temperatures but the draft proposes "
                         f"{drafts_per_round(draft.config)} positions per round")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    stops = tuple(target.config.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    if scheduler is not None:
        check_sps(scheduler.sps, rows=batch)
    capacity = round_capacity(int(prompt_width) + int(max_new_tokens) + drafts_per_round(draft.config) + 2)
    buckets, padded_fallback = _verify_plan(target, ragged_verify, scheduler, threshold, batch,
                                            drafts_per_round(draft.config) + 1)
    settings = SpecSettings(int(max_new_tokens), sampling, stops, float(threshold), capacity, capacity,
                            scheduler.policy if scheduler is not None else None, buckets, padded_fallback)
    # traced, not static: a new SPS curve or new temperatures do not recompile (z / 1.0 == z exactly)
    sched_sps = scheduler.sched_args if scheduler is not None else None
    conf_temps = None
    if draft.config.has_confidence:
        conf_temps = _temperatures_array(tuple(float(t) for t in temps) if temps is not None
                                         else (1.0,) * drafts_per_round(draft.config))
    return settings, sched_sps, conf_temps


@functools.lru_cache(maxsize=64)
def _temperatures_array(temps: tuple[float, ...]) -> jax.Array:
    # one device array per set of temperatures, not an eager device put on every call (~0.1 ms at batch 1)
    return jnp.asarray(temps, jnp.float32)


def spec_slot_engine(target, draft, *, num_slots: int, max_prompt_len: int, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, threshold: float = 0.0,
                     scheduler=None, stop_token_ids: Sequence[int] | None = None, seed: int = 0, calibration=None,
                     ragged_verify: bool | None = None, refill_at: int | None = None,
                     shrink: bool = False) -> SpecSlotEngine:
    """A :class:`~dspark_jax.decode.spec_slots.SpecSlotEngine` with :func:`speculative_generate`'s arguments,
    for jobs that feed requests as they go (``engine.submit`` while iterating ``engine.run(followups=True)``);
    the threshold / scheduler see the ``num_slots`` slots as their batch."""
    settings, sched_sps, conf_temps = _spec_setup(
        target, draft, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        threshold=threshold, scheduler=scheduler, stop_token_ids=stop_token_ids, calibration=calibration,
        ragged_verify=ragged_verify, batch=num_slots, prompt_width=next_bucket(max_prompt_len))
    return SpecSlotEngine(target, draft, settings, num_slots=num_slots, max_prompt_len=max_prompt_len, seed=seed,
                          refill_at=refill_at, sched_sps=sched_sps, conf_temps=conf_temps, shrink=shrink)


def _generate_slots(target, draft, rows, req, settings, seed, num_slots, refill_at, sched_sps, conf_temps,
                    prompts, shrink) -> GenerationOutput:
    """The prompts as a queue over ``num_slots`` refilled slots; the results laid out as the static loop's."""
    engine = SpecSlotEngine(target, draft, settings, num_slots=num_slots, max_prompt_len=max(len(r) for r in rows),
                            seed=seed, refill_at=refill_at, sched_sps=sched_sps, conf_temps=conf_temps,
                            shrink=shrink)
    for i, r in enumerate(rows):
        engine.submit(int(req[i]), r, tag=i)
    results = dict(engine.run())
    n, bs = len(rows), drafts_per_round(draft.config)
    rounds = max(len(results[i].accept) for i in range(n))
    out = np.full((n, settings.max_new_tokens + bs + 1), -1, np.int32)
    stats = dict(accept=np.zeros((n, rounds), np.int32), proposed=np.zeros((n, rounds), np.int32),
                 conf=np.zeros((n, rounds, bs), np.float32), conf_logits=np.zeros((n, rounds, bs), np.float32),
                 outcome=np.zeros((n, rounds, bs), bool), plain=np.zeros((n, rounds), bool))
    inv = {k: np.zeros(n, np.int32) for k in ("target_len", "draft_len", "pending", "prompt_len")}
    for i in range(n):
        r = results[i]
        out[i, :len(r.tokens)] = r.tokens
        k = len(r.accept)
        for name in stats:
            stats[name][i, :k] = getattr(r, name)
        for name in inv:
            inv[name][i] = r.invariants[name]
    res = dict(out=out, n_out=np.asarray([len(results[i].tokens) for i in range(n)]), rounds=rounds, stats=stats,
               t_len=inv["target_len"], d_len=inv["draft_len"], pend_count=inv["pending"],
               prompt_len=inv["prompt_len"])
    st = engine.stats
    output = _to_output(res, settings, st.seconds, target, prompts)
    output.stats.update(slots=num_slots, slot_utilisation=st.utilisation, prompt_passes=st.prompt_passes,
                        syncs=st.syncs, rounds=st.decode_steps)
    return output


def _verify_plan(target, ragged_verify, scheduler, threshold, batch: int, width: int):
    """-> (ragged buckets, padded fallback) for :class:`SpecSettings` (see ``ragged_verify``)."""
    can_flatten = hasattr(target, "forward_flat")
    if ragged_verify is None and scheduler is not None and scheduler.verify_buckets is not None:
        ragged_verify = scheduler.verify_buckets
    if isinstance(ragged_verify, (tuple, list)):
        plan = tuple(int(b) for b in ragged_verify)
        if any(b < 1 for b in plan) or list(plan) != sorted(set(plan)):
            raise ValueError(f"ragged_verify buckets must be increasing positive ints, got {ragged_verify!r}")
        plan = tuple(b for b in plan if b < batch * width) + ((batch * width,) if plan and plan[-1] >= batch * width
                                                             else ())
        if plan and not can_flatten:
            raise ValueError(f"ragged_verify buckets given but {type(target).__name__} has no forward_flat")
        if not plan:
            return (), False
        return plan, plan[-1] < batch * width
    if ragged_verify and not can_flatten:
        raise ValueError(f"ragged_verify=True but {type(target).__name__} has no forward_flat")
    if ragged_verify is None:
        # one row verifies at most Bs+1 tokens: too few for packing to save more than the switch costs
        ragged_verify = can_flatten and (scheduler is not None or threshold > 0) and batch > 1
    return (ragged_buckets(batch, width) if ragged_verify else ()), False


def _check_pair(target, draft) -> None:
    tc, dc = target.config, draft.config
    if dc.arch is None:
        raise ValueError("draft config is not bound to a target architecture")
    for f in ("hidden_size", "vocab_size"):
        if getattr(dc.arch, f) != getattr(tc, f):
            raise ValueError(f"draft {f}={getattr(dc.arch, f)} does not fit the target's {getattr(tc, f)}")
    if dc.target_layer_ids[-1] >= tc.num_hidden_layers - 1:
        raise ValueError(f"draft taps {list(dc.target_layer_ids)} do not fit a {tc.num_hidden_layers}-layer target")


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "settings"))
def _spec_jit(t_graph, t_state, d_graph, d_state, ids, lengths, key, req_ids, sched_sps, conf_temps,
              switch_state=None, *, settings: SpecSettings):
    target = t_graph.merge(t_state)
    draft = d_graph.merge(d_state)
    rows = init_rows(target, draft, ids, lengths, request_keys(key, req_ids), settings)
    carry = loop_state(rows, settings, drafts_per_round(draft.config), switch_state)
    head_hv = head_for_loop(draft)

    def cond(c):
        return (c["rnd"] < settings.max_new_tokens) & ~jnp.all(c["done"])

    final = jax.lax.while_loop(cond, lambda c: spec_round(target, draft, c, settings, sched_sps, conf_temps,
                                                          head_hv), carry)
    d_len, pending = draft_context_len(draft, final["dstate"])
    switch = {k: final["sched"][k] for k in SWITCH_FIELDS} if switch_state is not None else None
    return dict(out=final["out"], n_out=final["n_out"], rounds=final["rnd"], stats=final["stats"],
                t_len=final["t_cache"].lengths, d_len=d_len, pend_count=pending, prompt_len=lengths, switch=switch)


def _to_output(res, settings: SpecSettings, seconds: float, target, prompts) -> GenerationOutput:
    max_new = settings.max_new_tokens
    n_out = np.minimum(np.asarray(res["n_out"]), max_new)
    tokens = np.asarray(res["out"])[:, :max_new].copy()
    tokens[np.arange(max_new)[None, :] >= n_out[:, None]] = -1
    rounds = int(res["rounds"])
    acc = np.asarray(res["stats"]["accept"])[:, :rounds]
    prop = np.asarray(res["stats"]["proposed"])[:, :rounds]
    outcome = np.asarray(res["stats"]["outcome"])[:, :rounds]
    drafts = outcome.sum(axis=-1).astype(np.int32)          # m per round (accepted drafts, after a stop cut)
    summary = summarize(round_counts(acc, prop, drafts, max_positions=outcome.shape[-1]))
    stats = {
        "seconds": seconds, "new_tokens": int(n_out.sum()), "tokens_per_s": float(n_out.sum() / seconds),
        "rounds": rounds, "row_rounds": summary["rounds"], "batch": len(n_out), "tau": summary["tau"],
        "mean_proposal": summary["mean_proposal"], "verify_rate": summary["verify_rate"],
        # tokens the target verified over all row-rounds (anchors + proposed drafts): the scheduler's budget
        "verified_tokens": int((prop + 1)[acc > 0].sum()),
    }
    for k, rate in enumerate(summary["accept_rate"]):   # accept_rate@k = #rounds with m > k / #rounds with L > k
        stats[f"accept_rate@{k}"] = 0.0 if rate is None else rate
    stats["_invariants"] = {"target_len": np.asarray(res["t_len"]), "draft_len": np.asarray(res["d_len"]),
                            "pending": np.asarray(res["pend_count"]), "prompt_len": np.asarray(res["prompt_len"])}
    stats["_round_confidence"] = np.asarray(res["stats"]["conf"])[:, :rounds]
    stats["_round_confidence_logits"] = np.asarray(res["stats"]["conf_logits"])[:, :rounds]
    stats["_round_outcome"] = np.asarray(res["stats"]["outcome"])[:, :rounds]
    # row-rounds that were plain decoding steps (speculation switched off: no draft work)
    stats["_round_plain"] = np.asarray(res["stats"]["plain"])[:, :rounds]
    stats["plain_rounds"] = int(stats["_round_plain"].sum())
    texts = None
    tok = getattr(target, "tokenizer", None)
    if tok is not None and any(isinstance(p, str) for p in prompts):
        texts = [tok.decode(r[:n].tolist()) for r, n in zip(tokens, n_out)]
    return GenerationOutput(tokens=tokens, lengths=n_out, stats=stats, accept_lengths=acc, proposal_lengths=prop,
                            accepted_drafts=drafts, texts=texts)
