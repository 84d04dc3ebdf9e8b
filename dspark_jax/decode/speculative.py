"""The jitted, batched draft-verify loop (spec §4): one ``lax.while_loop`` over rounds for the whole batch.

Per round and row: propose a block from the draft cache + pending context taps (sequential Markov sampling)
-> choose the proposal length L (the full block, a confidence threshold, or a scheduler from
:mod:`dspark_jax.decode.scheduler` over all active rows) -> verify all rows in one target
forward with per-row valid lengths -> rejection sampling -> commit m+1 tokens -> crop both caches by
setting lengths -> the verified rows' taps become the next pending context. No host round trip per round.

Invariants (spec §8.12), per row after each round: target cache length == start; draft cache length +
pending rows == start; committed text == prompt + output[:start + 1 - prompt_len].
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decode.calibrate import resolve_temperatures
from dspark_jax.decode.output import GenerationOutput
from dspark_jax.decode.prefill import prefill as prefill_target
from dspark_jax.decode.prompts import encode_prompts, pad_batch
from dspark_jax.decode.ragged import ragged_buckets, verify_forward
from dspark_jax.decode.sampling import SamplingConfig, sample_tokens
from dspark_jax.decode.scheduler import PrefixScheduler, SchedulePolicy, ZeroOverheadScheduler, check_sps
from dspark_jax.decode.verify import verify_block
from dspark_jax.eval.metrics import round_counts, summarize
from dspark_jax.nn.static_graph import split_static


@dataclasses.dataclass(frozen=True)
class SpecSettings:
    """Static settings of one compiled loop."""

    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: tuple[int, ...]
    threshold: float
    target_capacity: int
    draft_capacity: int
    scheduler: SchedulePolicy | None = None     # the rule; its SPS table is a traced argument of the loop
    ragged_buckets: tuple[int, ...] = ()         # () = padded [B, Bs+1] verify; else flat capacities (ragged.py)


def speculative_generate(target, draft, prompts, max_new_tokens: int = 256, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, threshold: float = 0.0, scheduler=None,
                         stop_token_ids: Sequence[int] | None = None, seed: int = 0,
                         calibration=None, ragged_verify: bool | None = None) -> GenerationOutput:
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
      stop_token_ids: a row stops once one of these is committed; None = the target config's eos ids.
      seed: PRNG seed.
      calibration: STS temperatures T_k applied to the confidence logits (``sigmoid(c_k / T_k)``) before the
        threshold / scheduler and in the recorded confidences. None = the draft's ``sts_temperatures``
        attribute when set (``dj.load_draft`` sets it from ``sts_temperatures.json`` in the draft directory),
        else none; False = raw confidences; or a sequence of Bs floats, or a path to such a JSON file / to a
        draft directory holding one (see :mod:`dspark_jax.decode.calibrate`).
      ragged_verify: True = the target verifies a flattened batch of exactly the ``sum(L + 1)`` chosen tokens,
        padded only up to the next static bucket (:mod:`dspark_jax.decode.ragged`), so verification costs what
        the threshold / scheduler chose instead of ``B * (Bs+1)`` tokens; False = the padded forward. None
        (default) = ragged when proposal lengths vary (a threshold or a scheduler), the batch has more than one
        row (at batch 1 the bucket switch costs more than it saves: measured on CPU) and the target supports it.
        Same output either way.
    Returns:
      :class:`GenerationOutput` with tokens ``[B, max_new_tokens]`` (-1 padded), lengths, accept_lengths
      ``[B, rounds]`` (m+1 per round; m for a terminal stop round; 0 where a row had no round),
      proposal_lengths ``[B, rounds]``, and stats (tau, rounds, accept_rate@k, tokens/s, ...). Per round,
      ``stats['_round_confidence']`` ``[B, rounds, Bs]`` holds the (calibrated) confidences the loop used,
      ``stats['_round_confidence_logits']`` the raw logits (what calibration fits), ``stats['_round_outcome']``
      the per-position accepted flags.
    """
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
    if temps is not None and len(temps) != _drafts_per_round(draft.config):
        raise ValueError(f"calibration has {len(temps)} temperatures but the draft proposes "
                         f"{_drafts_per_round(draft.config)} positions per round")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    rows = encode_prompts(prompts, getattr(target, "tokenizer", None), target.config.vocab_size)
    stops = tuple(target.config.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    ids, lengths = pad_batch(rows)
    if scheduler is not None:
        check_sps(scheduler.sps, rows=ids.shape[0])
    capacity = ids.shape[1] + int(max_new_tokens) + _drafts_per_round(draft.config) + 2
    can_flatten = hasattr(target, "forward_flat")
    if ragged_verify and not can_flatten:
        raise ValueError(f"ragged_verify=True but {type(target).__name__} has no forward_flat")
    if ragged_verify is None:
        # one row verifies at most Bs+1 tokens: too few for packing to save more than the switch costs
        ragged_verify = can_flatten and (scheduler is not None or threshold > 0) and ids.shape[0] > 1
    buckets = ragged_buckets(ids.shape[0], _drafts_per_round(draft.config) + 1) if ragged_verify else ()
    settings = SpecSettings(int(max_new_tokens), sampling, stops, float(threshold), capacity, capacity,
                            scheduler.policy if scheduler is not None else None, buckets)
    # traced, not static: a new SPS curve or new temperatures do not recompile (z / 1.0 == z exactly)
    sched_sps = jnp.asarray(scheduler.sps, jnp.float32) if scheduler is not None else None
    conf_temps = None
    if draft.config.has_confidence:
        conf_temps = jnp.asarray(temps if temps is not None else (1.0,) * _drafts_per_round(draft.config),
                                 jnp.float32)
    t_graph, t_state = split_static(target)
    d_graph, d_state = split_static(draft)
    t0 = time.perf_counter()
    res = _spec_jit(t_graph, t_state, d_graph, d_state, jnp.asarray(ids), jnp.asarray(lengths),
                    jax.random.key(seed), sched_sps, conf_temps, settings=settings)
    res = jax.device_get(res)
    seconds = time.perf_counter() - t0
    return _to_output(res, settings, seconds, target, prompts)


def _check_pair(target, draft) -> None:
    tc, dc = target.config, draft.config
    if dc.arch is None:
        raise ValueError("draft config is not bound to a target architecture")
    for f in ("hidden_size", "vocab_size"):
        if getattr(dc.arch, f) != getattr(tc, f):
            raise ValueError(f"draft {f}={getattr(dc.arch, f)} does not fit the target's {getattr(tc, f)}")
    if dc.target_layer_ids[-1] >= tc.num_hidden_layers - 1:
        raise ValueError(f"draft taps {list(dc.target_layer_ids)} do not fit a {tc.num_hidden_layers}-layer target")


def _drafts_per_round(cfg) -> int:
    return cfg.ttt_length if cfg.is_eagle3 else cfg.block_size


# ---- drafter adapters: how each draft family ingests the prompt, proposes, and absorbs a commit --------
# DSpark/DFlash state: (cache, pending taps [B, Bs+1, Lt*H], pending count [B]); the verified rows' taps wait
# as pending context until the next proposal consumes them. Eagle3 state: (cache, last_hidden [B, H]); the
# committed positions are written into its cache right away, paired with the tokens that follow them.

def _ingest_prompt(draft, cache, taps, ids, lengths, first):
    if draft.config.is_eagle3:
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        nxt = jnp.where(jnp.arange(ids.shape[1])[None, :] == (lengths - 1)[:, None], first[:, None], nxt)
        cache, last = draft.extend(cache, taps, nxt, lengths)
        return (cache, last)
    bs = draft.config.block_size
    _, cache = draft.block_hidden(cache, taps, lengths, first)  # the block output is unused: context only
    return (cache, jnp.zeros((ids.shape[0], bs + 1, taps.shape[-1]), taps.dtype), jnp.zeros_like(lengths))


def _propose(draft, dstate, anchor, key, sampling, stop_ids, head_hv=None):
    """-> (tokens [B, L], logits [B, L, V], confidence logits or None, max usable length [B], cache after)."""
    if draft.config.is_eagle3:
        cache, last = dstate
        prop = draft.propose(cache, last, key, sampling, stop_token_ids=stop_ids)
        return prop.tokens, prop.logits, None, prop.num_proposed, prop.cache
    cache, pend, count = dstate
    prop = draft.propose(cache, pend, count, anchor, key, sampling, head_hv=head_hv)
    return prop.tokens, prop.logits, prop.confidence_logits, None, prop.cache


def _absorb_commit(draft, dstate, cache_after, verify_taps, committed, n_rows, active):
    """The verified rows ``0..n_rows-1`` (x_start and accepted drafts) become draft context."""
    if draft.config.is_eagle3:
        _, last = dstate
        new_cache, new_last = draft.extend(cache_after, verify_taps, jnp.maximum(committed, 0), n_rows, last)
        cache = new_cache.with_lengths(jnp.where(active, new_cache.lengths, dstate[0].lengths))
        return (cache, jnp.where(active[:, None], new_last, last))
    cache, pend, count = dstate
    cache = cache_after.with_lengths(jnp.where(active, cache_after.lengths, cache.lengths))
    return (cache, jnp.where(active[:, None, None], verify_taps, pend), jnp.where(active, n_rows, count))


def _draft_context_len(draft, dstate):
    """Draft cache length + pending rows (== start, spec §8.12)."""
    if draft.config.is_eagle3:
        return dstate[0].lengths, jnp.zeros_like(dstate[0].lengths)
    return dstate[0].lengths, dstate[2]


def _confidences(conf_logits, temperatures):
    """``[B, Bs]`` confidence logits -> probabilities ``sigmoid(c_k / T_k)`` (T = 1 without calibration)."""
    if conf_logits is None:
        return None
    z = conf_logits.astype(jnp.float32)
    if temperatures is not None:
        z = z / temperatures[None, :]
    return jax.nn.sigmoid(z)


def _proposal_lengths(conf_p, threshold: float, block_size: int, batch: int):
    """L = index of the first position whose confidence sigmoid(c_k / T_k) < theta (block_size if none)."""
    if threshold <= 0 or conf_p is None:
        return jnp.full((batch,), block_size, jnp.int32)
    low = conf_p < threshold
    return jnp.where(jnp.any(low, axis=1), jnp.argmax(low, axis=1), block_size).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "settings"))
def _spec_jit(t_graph, t_state, d_graph, d_state, ids, lengths, key, sched_sps, conf_temps, *,
              settings: SpecSettings):
    target = t_graph.merge(t_state)
    draft = d_graph.merge(d_state)
    cfg = draft.config
    bs, taps = _drafts_per_round(cfg), cfg.target_layer_ids
    batch = ids.shape[0]
    max_new = settings.max_new_tokens
    max_rounds = max_new
    out_width = max_new + bs + 1
    stop_arr = jnp.asarray(settings.stop_ids if settings.stop_ids else (-2,), jnp.int32)
    rows = jnp.arange(batch)
    slots = jnp.arange(bs + 1)[None, :]

    # ---- prefill: target over the prompt, first token, the draft ingests the prompt's context -----------
    pre = prefill_target(target, ids, lengths, settings.target_capacity, tap_layer_ids=taps)
    key, k_first = jax.random.split(key)
    first = sample_tokens(pre.logits[:, 0], k_first, settings.sampling)
    dstate = _ingest_prompt(draft, draft.init_cache(batch, settings.draft_capacity), pre.taps, ids, lengths, first)
    out = jnp.full((batch, out_width), -1, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((batch,), jnp.int32)
    done = jnp.isin(first, stop_arr) | (n_out >= max_new)
    stats = dict(accept=jnp.zeros((batch, max_rounds), jnp.int32), proposed=jnp.zeros((batch, max_rounds), jnp.int32),
                 conf=jnp.zeros((batch, max_rounds, bs), jnp.float32),
                 conf_logits=jnp.zeros((batch, max_rounds, bs), jnp.float32),
                 outcome=jnp.zeros((batch, max_rounds, bs), bool))
    sched = settings.scheduler
    carry = dict(rnd=jnp.int32(0), t_cache=pre.cache, dstate=dstate, anchor=first, out=out, n_out=n_out, done=done,
                 key=key, stats=stats, sched=sched.init_state(batch, bs) if sched is not None else ())

    # DSpark / DFlash base logits are B * Bs rows per round: contract them against a [H, V] copy made here, once
    head_hv = None if cfg.is_eagle3 else draft.decode_head()

    def cond(c):
        return (c["rnd"] < max_rounds) & ~jnp.all(c["done"])

    def body(c):
        key, k_prop, k_ver = jax.random.split(c["key"], 3)
        active = ~c["done"]
        start = c["t_cache"].lengths
        tokens, logits, conf, usable, d_cache_after = _propose(draft, c["dstate"], c["anchor"], k_prop,
                                                               settings.sampling, settings.stop_ids, head_hv)
        conf_p = _confidences(conf, conf_temps)
        sched_state = c["sched"]
        if sched is not None:
            # the scheduler sees only draft-side information (confidences of this round's drafts), so any L
            # it picks keeps rejection sampling lossless; finished rows do not count in its batch
            L, sched_state = sched(conf_p, active, sched_state, c["rnd"], sched_sps)
            L = jnp.where(active, L, 0)
        else:
            L = _proposal_lengths(conf_p, settings.threshold, bs, batch)
        if usable is not None:
            L = jnp.minimum(L, usable)
        seq = jnp.concatenate([c["anchor"][:, None], tokens], axis=1)
        if settings.ragged_buckets:
            # finished rows verify nothing (their results are discarded anyway)
            v_logits, v_taps, v_cache = verify_forward(target, seq, jnp.where(active, L + 1, 0), c["t_cache"],
                                                       taps, settings.ragged_buckets)
        else:
            ver = target(seq, c["t_cache"], num_new=L + 1, tap_layer_ids=taps)
            v_logits, v_taps, v_cache = ver.logits, ver.taps, ver.cache
        verdict = verify_block(tokens, logits, v_logits, L, k_ver, settings.sampling)
        m = verdict.num_accepted
        # a stop token among the accepted drafts ends the row there, without a bonus token
        is_stop = jnp.isin(tokens, stop_arr) & (slots[:, :bs] < m[:, None])
        stop_in_drafts = jnp.any(is_stop, axis=1)
        m_cut = jnp.where(stop_in_drafts, jnp.argmax(is_stop, axis=1) + 1, m)
        n_commit = jnp.where(stop_in_drafts, m_cut, m_cut + 1)
        padded = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1)
        committed = jnp.where(slots == m_cut[:, None], verdict.next_token[:, None], padded)
        committed = jnp.where(slots < n_commit[:, None], committed, -1)
        # write the committed tokens at n_out .. n_out + n_commit - 1 (inactive rows write nothing)
        write = active[:, None] & (slots < n_commit[:, None])
        out = c["out"].at[rows[:, None], jnp.where(write, c["n_out"][:, None] + slots, out_width)].set(
            committed, mode="drop")
        n_out = jnp.where(active, c["n_out"] + n_commit, c["n_out"])
        committed_stop = stop_in_drafts | jnp.isin(verdict.next_token, stop_arr)
        done = c["done"] | (active & (committed_stop | (n_out >= max_new)))
        t_cache = v_cache.with_lengths(jnp.where(active, start + n_commit, start))
        dstate = _absorb_commit(draft, c["dstate"], d_cache_after, v_taps, committed, n_commit, active)
        r, st = c["rnd"], c["stats"]
        conf_rec = conf_p if conf_p is not None else jnp.zeros((batch, bs))
        logit_rec = conf.astype(jnp.float32) if conf is not None else jnp.zeros((batch, bs))
        stats = dict(accept=st["accept"].at[:, r].set(jnp.where(active, n_commit, 0)),
                     proposed=st["proposed"].at[:, r].set(jnp.where(active, L, 0)),
                     conf=st["conf"].at[:, r].set(jnp.where(active[:, None], conf_rec, 0.0)),
                     conf_logits=st["conf_logits"].at[:, r].set(jnp.where(active[:, None], logit_rec, 0.0)),
                     outcome=st["outcome"].at[:, r].set(active[:, None] & (slots[:, :bs] < m_cut[:, None])))
        return dict(rnd=r + 1, t_cache=t_cache, dstate=dstate, anchor=jnp.where(active, verdict.next_token, c["anchor"]),
                    out=out, n_out=n_out, done=done, key=key, stats=stats, sched=sched_state)

    final = jax.lax.while_loop(cond, body, carry)
    d_len, pending = _draft_context_len(draft, final["dstate"])
    return dict(out=final["out"], n_out=final["n_out"], rounds=final["rnd"], stats=final["stats"],
                t_len=final["t_cache"].lengths, d_len=d_len, pend_count=pending, prompt_len=lengths)


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
    texts = None
    tok = getattr(target, "tokenizer", None)
    if tok is not None and any(isinstance(p, str) for p in prompts):
        texts = [tok.decode(r[:n].tolist()) for r, n in zip(tokens, n_out)]
    return GenerationOutput(tokens=tokens, lengths=n_out, stats=stats, accept_lengths=acc, proposal_lengths=prop,
                            accepted_drafts=drafts, texts=texts)
