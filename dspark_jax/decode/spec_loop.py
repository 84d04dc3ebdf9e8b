"""One round of the draft-verify loop (spec §4), written once for the static batch (decode/speculative.py) and
the slot engine (decode/spec_slots.py).

Per round and row: propose a block from the draft cache + pending context taps (sequential Markov sampling)
-> choose the proposal length L (the full block, a confidence threshold, or a scheduler from
:mod:`dspark_jax.decode.scheduler` over all active rows) -> verify all rows in one target
forward with per-row valid lengths -> rejection sampling -> commit m+1 tokens -> crop both caches by
setting lengths -> the verified rows' taps become the next pending context.

Invariants (spec §8.12), per row after each round: target cache length == start; draft cache length +
pending rows == start; committed text == prompt + output[:start + 1 - prompt_len].

Sampling: each request has its own key (``sampling.request_keys``); its first token draws with fold 0, round r
with fold ``1 + r`` of the request's rounds, so a request's tokens do not depend on the other rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.decode.control_flow import run_if
from dspark_jax.decode.prefill import prefill as prefill_target
from dspark_jax.decode.ragged import verify_forward
from dspark_jax.decode.sampling import SamplingConfig, sample_rows, sample_tokens, split_keys
from dspark_jax.decode.scheduler import PLAIN_RUN_CHUNK, SchedulePolicy
from dspark_jax.decode.verify import verify_block


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
    padded_fallback: bool = False                # rounds over the largest bucket run the padded forward


def drafts_per_round(cfg) -> int:
    return cfg.drafts_per_round


# Each draft family implements the loop's interface (drafts/common.py): its per-row state after the prompt, a
# round's proposal, absorbing what the round committed, its context length. The loop never asks which family.

def draft_context_len(draft, dstate):
    """Draft cache length + pending rows (== start, spec §8.12)."""
    return draft.context_lengths(dstate)


def confidences(conf_logits, temperatures):
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


# ---- the loop, in pieces the static batch and the slot engine (decode/spec_slots.py) share -------------------
# Per-row state ("rows"): t_cache, dstate, anchor [B], out [B, W], n_out [B], done [B], keys [B] (request keys),
# row_rnd [B] (rounds the row's request has run), stats (per row and round). Every leaf has the row axis first, so
# the slot engine can write a prompt pass's rows into any slots. Loop state adds the global round ``rnd`` and the
# scheduler's state.

def _round_keys(keys, row_rnd):
    """Row keys of a round: request key folded with ``1 + round`` (fold 0 drew the request's first token)."""
    return jax.vmap(jax.random.fold_in)(keys, row_rnd + 1)


def init_rows(target, draft, ids, lengths, req_keys, settings: SpecSettings) -> dict:
    """Prompt pass over ``ids [B, P]``: the target's cache and first token, the draft's context -> rows."""
    cfg = draft.config
    bs, batch = drafts_per_round(cfg), ids.shape[0]
    max_new, max_rounds = settings.max_new_tokens, settings.max_new_tokens
    stop_arr = jnp.asarray(settings.stop_ids if settings.stop_ids else (-2,), jnp.int32)
    pre = prefill_target(target, ids, lengths, settings.target_capacity, tap_layer_ids=cfg.target_layer_ids)
    first = sample_rows(pre.logits[:, 0], req_keys, jnp.zeros((batch,), jnp.int32), settings.sampling)
    dstate = draft.loop_state_after_prompt(draft.init_cache(batch, settings.draft_capacity), pre.taps, ids, lengths,
                                           first)
    out = jnp.full((batch, max_new + bs + 1), -1, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((batch,), jnp.int32)
    stats = dict(accept=jnp.zeros((batch, max_rounds), jnp.int32), proposed=jnp.zeros((batch, max_rounds), jnp.int32),
                 conf=jnp.zeros((batch, max_rounds, bs), jnp.float32),
                 conf_logits=jnp.zeros((batch, max_rounds, bs), jnp.float32),
                 outcome=jnp.zeros((batch, max_rounds, bs), bool), plain=jnp.zeros((batch, max_rounds), bool))
    return dict(t_cache=pre.cache, dstate=dstate, anchor=first, out=out, n_out=n_out,
                done=jnp.isin(first, stop_arr) | (n_out >= max_new), keys=req_keys,
                row_rnd=jnp.zeros((batch,), jnp.int32), stats=stats, prompt_len=lengths.astype(jnp.int32))


def spec_round(target, draft, c: dict, settings: SpecSettings, sched_args, conf_temps, head_hv,
               run_while=None, forced_lengths=None, verify_branch=None) -> dict:
    """One iteration of the loop over every row of ``c`` (finished rows compute but change nothing): a draft-verify
    round, or, when the scheduler has switched speculation off (decided by earlier rounds), a run of plain decoding
    steps (:func:`plain_run`; ``run_while(done [B]) -> bool`` may end it early, e.g. to refill slots).

    The plain run's step loop sits at the top level of this body (zero steps when speculating) and the draft-verify
    round runs under :func:`run_if`, not a ``cond``: XLA:CPU ran the same step loop nested in a ``cond`` branch ~25%
    slower per step (0.19 vs 0.15 ms at batch 4 on the demo-sized target) and copies the caches through a ``cond``.
    ``forced_lengths`` / ``verify_branch``: see :func:`draft_verify_round` (the round profile times this whole round,
    the switch's machinery included)."""
    sched = settings.scheduler
    forced = dict(forced_lengths=forced_lengths, verify_branch=verify_branch)
    if sched is None or not sched.switch:
        return draft_verify_round(target, draft, c, settings, sched_args, conf_temps, head_hv, **forced)
    steps = sched.plain_steps(c["sched"], sched_args, ~c["done"])
    # under run_if: a speculative round does not build the run's tap buffer ([B, Bs+1+chunk, Lt*H], MBs)
    c = run_if(steps > 0, lambda c: plain_run(target, draft, c, settings, steps, run_while), c)
    return run_if(steps == 0, lambda c: draft_verify_round(target, draft, c, settings, sched_args, conf_temps,
                                                           head_hv, **forced), c)


def plain_run(target, draft, c: dict, settings: SpecSettings, steps, run_while=None) -> dict:
    """``steps`` (int32, at most the policy's longest run) plain decoding steps, in one tight
    inner loop: per step one target forward over each row's anchor, a token sampled from it, one token committed.
    It stops early once every row is done or ``run_while(done)`` is False. The draft does no work inside the run:
    the anchors' taps collect in a buffer ``[B, Bs+1+N, Lt*H]`` after the pending rows (N = the longest run that
    fits) and the draft ingests them all in one context pass at the end, so the next proposal sees every committed
    token. Per-round stats are written once, after the run. Same tokens, keys and stats as single plain steps.
    Zero steps (speculation on) returns ``c`` unchanged."""
    sched = settings.scheduler
    taps = draft.config.target_layer_ids
    batch, out_width = c["out"].shape
    stop_arr = jnp.asarray(settings.stop_ids if settings.stop_ids else (-2,), jnp.int32)
    rows = jnp.arange(batch)
    buf, count = draft.plain_tap_buffer(c["dstate"], min(sched.off_rounds[1], PLAIN_RUN_CHUNK,
                                                         settings.max_new_tokens))
    width = buf.shape[1]
    keys = c["keys"]

    def cond(carry):
        i, done = carry[0], carry[5]
        go = (i < steps) & ~jnp.all(done)
        return go if run_while is None else go & run_while(done)

    def body(carry):
        i, t_cache, anchor, out, n_out, done, row_rnd, buf, n_buf = carry
        active = ~done
        start = t_cache.lengths
        _, k_ver = split_keys(_round_keys(keys, row_rnd), 2)
        ver = target(anchor[:, None], t_cache, num_new=jnp.ones((batch,), jnp.int32), tap_layer_ids=taps)
        nxt = sample_tokens(ver.logits[:, 0], k_ver, settings.sampling)
        out = out.at[rows, jnp.where(active, n_out, out_width)].set(nxt, mode="drop")
        n_out = jnp.where(active, n_out + 1, n_out)
        done = done | (active & (jnp.isin(nxt, stop_arr) | (n_out >= settings.max_new_tokens)))
        t_cache = ver.cache.with_lengths(jnp.where(active, start + 1, start))
        buf = buf.at[rows, jnp.where(active, n_buf, width)].set(ver.taps[:, 0].astype(buf.dtype), mode="drop")
        return (i + 1, t_cache, jnp.where(active, nxt, anchor), out, n_out, done, row_rnd + active, buf,
                n_buf + active)

    init = (jnp.int32(0), c["t_cache"], c["anchor"], c["out"], c["n_out"], c["done"], c["row_rnd"], buf, count)
    i, t_cache, anchor, out, n_out, done, row_rnd, buf, n_buf = jax.lax.while_loop(cond, body, init)

    def finish(c):
        dstate = draft.absorb_plain_run(c["dstate"], buf, n_buf, anchor)
        r0, st = c["row_rnd"], c["stats"]
        j = jnp.arange(st["accept"].shape[1])[None, :]
        ran = (j >= r0[:, None]) & (j < row_rnd[:, None])              # the rounds each row ran in this run
        stats = dict(st, accept=jnp.where(ran, 1, st["accept"]), plain=st["plain"] | ran)
        return dict(c, rnd=c["rnd"] + i, row_rnd=row_rnd, t_cache=t_cache,
                    dstate=dstate, anchor=anchor, out=out,
                    n_out=n_out, done=done, stats=stats, sched=sched.after_plain(c["sched"], i))

    # zero steps (a speculative round follows): nothing ran, the state is unchanged
    return run_if(i > 0, finish, c)


def draft_verify_round(target, draft, c: dict, settings: SpecSettings, sched_args, conf_temps, head_hv,
                       forced_lengths=None, verify_branch=None) -> dict:
    """One draft-verify round. ``forced_lengths [B]`` / ``verify_branch`` (int32) replace the scheduler's lengths
    and the verify forward's bucket choice: the round profile (decode/profile.py) times this code with them."""
    cfg = draft.config
    bs, taps = drafts_per_round(cfg), cfg.target_layer_ids
    batch, out_width = c["out"].shape
    max_new = settings.max_new_tokens
    stop_arr = jnp.asarray(settings.stop_ids if settings.stop_ids else (-2,), jnp.int32)
    rows = jnp.arange(batch)
    slots = jnp.arange(bs + 1)[None, :]
    sched = settings.scheduler

    k_prop, k_ver = split_keys(_round_keys(c["keys"], c["row_rnd"]), 2)
    active = ~c["done"]
    start = c["t_cache"].lengths
    prop = draft.propose_round(c["dstate"], c["anchor"], k_prop, settings.sampling, settings.stop_ids, head_hv)
    tokens, logits, conf, usable = prop.tokens, prop.logits, prop.confidence_logits, prop.usable
    conf_p = confidences(conf, conf_temps)
    sched_state = c["sched"]
    if sched is not None:
        # the scheduler sees only draft-side information (confidences of this round's drafts), so any L
        # it picks keeps rejection sampling lossless; finished rows do not count in its batch
        L, sched_state = sched(conf_p, active, sched_state, sched_args)
        L = jnp.where(active, L, 0)
    else:
        L = _proposal_lengths(conf_p, settings.threshold, bs, batch)
    if forced_lengths is not None:
        L = forced_lengths
    if usable is not None:
        L = jnp.minimum(L, usable)
    seq = jnp.concatenate([c["anchor"][:, None], tokens], axis=1)
    if settings.ragged_buckets:
        # finished rows verify nothing (their results are discarded anyway)
        v_logits, v_taps, v_cache = verify_forward(target, seq, jnp.where(active, L + 1, 0), c["t_cache"],
                                                   taps, settings.ragged_buckets,
                                                   padded_fallback=settings.padded_fallback, branch=verify_branch)
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
    if sched is not None:      # the switch-off rule learns from what this round committed (past for the next)
        sched_state = sched.after_round(sched_state, n_commit, L, active, sched_args)
    dstate = draft.absorb_commit(c["dstate"], prop.cache, v_taps, committed, n_commit, active)
    r, st = c["row_rnd"], c["stats"]
    at = jnp.where(active, r, st["accept"].shape[1])                  # out of range for finished rows: dropped
    conf_rec = conf_p if conf_p is not None else jnp.zeros((batch, bs))
    logit_rec = conf.astype(jnp.float32) if conf is not None else jnp.zeros((batch, bs))

    def rec(buf, value):
        return buf.at[rows, at].set(value, mode="drop")

    stats = dict(accept=rec(st["accept"], n_commit), proposed=rec(st["proposed"], L), conf=rec(st["conf"], conf_rec),
                 conf_logits=rec(st["conf_logits"], logit_rec),
                 outcome=rec(st["outcome"], slots[:, :bs] < m_cut[:, None]), plain=st["plain"])
    return dict(c, rnd=c["rnd"] + 1, row_rnd=r + active, t_cache=t_cache, dstate=dstate,
                anchor=jnp.where(active, verdict.next_token, c["anchor"]), out=out, n_out=n_out, done=done,
                stats=stats, sched=sched_state)


def loop_state(rows: dict, settings: SpecSettings, bs: int, switch_state: dict | None = None) -> dict:
    """Rows + the round counter and the scheduler's state (its switch-off part from ``switch_state`` if given)."""
    sched = settings.scheduler
    batch = rows["anchor"].shape[0]
    return dict(rows, rnd=jnp.int32(0),
                sched=sched.init_state(batch, bs, switch_state) if sched is not None else ())


def head_for_loop(draft):
    """The draft's ``[H, V]`` head for the loop's proposals, made once outside the loop body (or None)."""
    return draft.loop_head()


__all__ = ["SpecSettings", "drafts_per_round", "draft_context_len", "init_rows", "spec_round", "plain_run",
           "draft_verify_round", "loop_state", "head_for_loop"]
