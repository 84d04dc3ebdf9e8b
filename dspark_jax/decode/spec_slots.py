"""Continuous batching for speculative decoding: the draft-verify round of decode/spec_loop.py over a fixed number
of slots, each a row of the target's and the draft's caches, refilled with queued requests as earlier ones finish
(the host loop is decode/slots.py's ``SlotEngine``).

``_insert`` runs the prompt pass of the admitted requests (target cache, first token, the draft's context) and
writes those rows into free slots; ``_run`` runs rounds over all slots (finished slots compute but change nothing,
as in the static loop) until enough slots are free to refill. A threshold or a scheduler sees the live slots as
its batch. Each request samples with its own key, so its tokens equal the static batch's at any temperature.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decode.sampling import request_keys
from dspark_jax.decode.slots import SlotEngine, bucketed_indices, take_rows
from dspark_jax.decode.spec_loop import (
    SpecSettings,
    draft_context_len,
    drafts_per_round,
    head_for_loop,
    init_rows,
    loop_state,
    spec_round,
)
from dspark_jax.nn.static_graph import split_static


@dataclasses.dataclass
class SpecResult:
    """One request's speculative decoding: new tokens ``[n]``; per round of the request, ``accept`` (m+1, or m on
    a stop), ``proposed`` (L), ``conf`` / ``conf_logits`` ``[rounds, Bs]``, ``outcome`` (accepted flags), ``plain``
    (a plain decoding step); ``invariants``: target cache length, draft cache length, pending rows and prompt length
    at the end."""

    tokens: np.ndarray
    accept: np.ndarray
    proposed: np.ndarray
    conf: np.ndarray
    conf_logits: np.ndarray
    outcome: np.ndarray
    invariants: dict
    plain: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "settings", "num_slots", "prompt_bucket"))
def _empty_state(t_graph, t_state, d_graph, d_state, *, settings: SpecSettings, num_slots: int, prompt_bucket: int):
    """A loop state of ``num_slots`` finished rows, built from the shapes of a prompt pass (compiled once: tracing
    the prompt pass for its shapes costs ~45 ms on every call otherwise)."""
    target, draft = t_graph.merge(t_state), d_graph.merge(d_state)
    shapes = jax.eval_shape(lambda: init_rows(target, draft, jnp.zeros((num_slots, prompt_bucket), jnp.int32),
                                              jnp.ones((num_slots,), jnp.int32),
                                              request_keys(jax.random.key(0), jnp.zeros((num_slots,), jnp.int32)),
                                              settings))

    def zeros(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return request_keys(jax.random.key(0), jnp.zeros(x.shape, jnp.int32))
        return jnp.zeros(x.shape, x.dtype)

    rows = jax.tree.map(zeros, shapes)
    rows["done"] = jnp.ones((num_slots,), bool)
    return loop_state(rows, settings, drafts_per_round(draft.config))


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "settings"), donate_argnums=(4,))
def _insert(t_graph, t_state, d_graph, d_state, state, ids, lengths, slot_idx, req_ids, key, *,
            settings: SpecSettings):
    target, draft = t_graph.merge(t_state), d_graph.merge(d_state)
    rows = init_rows(target, draft, ids, lengths, request_keys(key, req_ids), settings)

    def put(big, new):
        return big.at[slot_idx].set(new.astype(big.dtype), mode="drop")

    # the scheduler's state and the round counter are the batch's, not a row's: kept
    return dict(state, **{k: jax.tree.map(put, state[k], v) for k, v in rows.items()})


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "settings"), donate_argnums=(4,))
def _run(t_graph, t_state, d_graph, d_state, state, refill_at, max_rounds, sched_sps, conf_temps, *,
         settings: SpecSettings):
    """Rounds over all slots while fewer than ``refill_at`` are free, some is live and fewer than ``max_rounds``
    rounds ran. Returns (state, rounds, slot-rounds of live requests)."""
    target, draft = t_graph.merge(t_state), d_graph.merge(d_state)
    head_hv = head_for_loop(draft)

    def cond(carry):
        step, c, _ = carry
        return (step < max_rounds) & ~jnp.all(c["done"]) & (jnp.sum(c["done"]) < refill_at)

    def body(carry):
        step, c, busy = carry
        # a plain run (switch-off) is several rounds in one iteration: count rounds and row-rounds, and let it
        # stop as soon as enough slots are free
        nxt = spec_round(target, draft, c, settings, sched_sps, conf_temps, head_hv,
                         run_while=lambda done: jnp.sum(done) < refill_at)
        return step + nxt["rnd"] - c["rnd"], nxt, busy + jnp.sum(nxt["row_rnd"] - c["row_rnd"])

    steps, state, busy = jax.lax.while_loop(cond, body, (jnp.int32(0), state, jnp.int32(0)))
    return state, steps, busy


@functools.partial(jax.jit, static_argnames=("d_graph",))
def _gather(d_graph, d_state, state, idx):
    """What the host keeps of finished slots ``idx``, in one transfer."""
    d_len, pending = draft_context_len(d_graph.merge(d_state), state["dstate"])
    return dict(out=state["out"][idx], n_out=state["n_out"][idx], row_rnd=state["row_rnd"][idx],
                stats={k: v[idx] for k, v in state["stats"].items()}, t_len=state["t_cache"].lengths[idx],
                d_len=d_len[idx], pending=pending[idx], prompt_len=state["prompt_len"][idx])


class SpecSlotEngine(SlotEngine):
    """Speculative decoding over refilled slots; a result is a :class:`SpecResult`. ``settings`` are the static
    loop's (capacities must hold ``max_prompt_len``'s bucket + ``max_new_tokens`` + a block + 2);
    ``sched_sps`` / ``conf_temps`` as ``speculative_generate`` passes them to its loop."""

    def __init__(self, target, draft, settings: SpecSettings, *, num_slots: int, max_prompt_len: int, seed: int = 0,
                 refill_at: int | None = None, sched_sps=None, conf_temps=None, shrink: bool = False):
        super().__init__(num_slots=num_slots, max_prompt_len=max_prompt_len, max_new_tokens=settings.max_new_tokens,
                         refill_at=refill_at, shrink=shrink)
        need = self.prompt_bucket + self.max_new + drafts_per_round(draft.config) + 2
        if min(settings.target_capacity, settings.draft_capacity) < need:
            raise ValueError(f"cache capacities {settings.target_capacity} / {settings.draft_capacity} are below the "
                             f"{need} slots a {self.max_prompt_len}-token prompt needs")
        self.target, self.draft, self.settings = target, draft, settings
        self.sched_sps, self.conf_temps = sched_sps, conf_temps
        self.key = jax.random.key(seed)

    def _begin(self):
        self._g = (*split_static(self.target), *split_static(self.draft))

    def _empty(self):
        self._state = _empty_state(*self._g, settings=self.settings, num_slots=self.num_slots,
                                   prompt_bucket=self.prompt_bucket)

    def _insert(self, ids, lengths, slot_idx, req):
        self._state = _insert(*self._g, self._state, ids, lengths, slot_idx, req, self.key,
                              settings=self.settings)

    def _run(self, threshold):
        self._state, steps, busy = _run(*self._g, self._state, jnp.int32(threshold), jnp.int32(self.max_new),
                                        self.sched_sps, self.conf_temps, settings=self.settings)
        self._done = np.asarray(jax.device_get(self._state["done"]))
        return jax.device_get((steps, busy))

    def _live(self):
        return ~self._done

    def _take(self, idx):
        rows = {k: v for k, v in self._state.items() if k not in ("rnd", "sched")}
        sched = self._state["sched"]
        if sched and sched["inner"]:   # the zero-overhead scheduler's ring buffers [delay, S, ...]; the rest is global
            sched = dict(sched, inner=jax.tree.map(lambda x: x[:, idx], sched["inner"]))
        self._state = dict(take_rows(rows, jnp.asarray(idx)), rnd=self._state["rnd"], sched=sched)

    def _harvest(self, done):
        got = jax.device_get(_gather(*self._g[2:], self._state, jnp.asarray(bucketed_indices(done))))
        results = []
        for j in range(len(done)):
            n, r = min(int(got["n_out"][j]), self.max_new), int(got["row_rnd"][j])
            st = {k: np.asarray(v[j, :r]) for k, v in got["stats"].items()}
            inv = {"target_len": int(got["t_len"][j]), "draft_len": int(got["d_len"][j]),
                   "pending": int(got["pending"][j]), "prompt_len": int(got["prompt_len"][j])}
            results.append(SpecResult(tokens=np.asarray(got["out"][j, :n]), accept=st["accept"],
                                      proposed=st["proposed"], conf=st["conf"], conf_logits=st["conf_logits"],
                                      outcome=st["outcome"], invariants=inv, plain=st["plain"]))
        return results


__all__ = ["SpecResult", "SpecSlotEngine"]
