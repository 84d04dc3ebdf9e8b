"""Continuous batching for plain decoding: a fixed number of slots, each a row of the target's KV cache, refilled
with queued requests as earlier ones finish.

Two compiled programs, both of static shape: ``_insert`` runs the prompt pass of the requests admitted into free
slots (one batched pass, prompt length and row count bucketed) and writes their cache rows, first token and
request key into those slots; ``_run`` decodes every live slot one token per step until enough slots are free to
refill (or no slot is live, or a step bound). The host loop in between harvests finished slots and admits the next
requests. Finished slots idle without advancing their cache length, so a slot never outgrows its capacity.

Each request samples with its own key (``sampling.request_keys``) and each token with that key folded with the
token's index, so a request's output depends on the seed and its request id only: the same alone, among any
others, with any number of slots, and equal to the static batch of :func:`dspark_jax.generate`.

The host loop (:class:`SlotEngine`) is shared with speculative decoding (decode/spec_slots.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.cache import KVCache, round_capacity
from dspark_jax.config import next_bucket
from dspark_jax.decode.prefill import prefill as prefill_target
from dspark_jax.decode.prompts import check_request_ids, pad_batch
from dspark_jax.decode.sampling import SamplingConfig, request_keys, sample_rows
from dspark_jax.nn.static_graph import split_static


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The decode state of ``S`` slots.

    cache: the target's KV cache, one row per slot (``[S, C, ...]`` per layer).
    last: ``[S]`` the last token of each slot (the next step's input).
    count: ``[S]`` tokens generated so far by the slot's request.
    live: ``[S]`` bool, the slot holds a request that has not finished.
    out: ``[S, max_new]`` the slot's request's tokens so far, -1 beyond.
    keys: ``[S]`` the slot's request key.
    """

    cache: KVCache
    last: jax.Array
    count: jax.Array
    live: jax.Array
    out: jax.Array
    keys: jax.Array


def _empty_slots(target, num_slots: int, capacity: int, max_new: int) -> Slots:
    return Slots(cache=target.init_cache(num_slots, capacity), last=jnp.zeros((num_slots,), jnp.int32),
                 count=jnp.zeros((num_slots,), jnp.int32), live=jnp.zeros((num_slots,), bool),
                 out=jnp.full((num_slots, max_new), -1, jnp.int32),
                 keys=request_keys(jax.random.key(0), jnp.zeros((num_slots,), jnp.int32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "sampling", "stop_ids"), donate_argnums=(2,))
def _insert(graphdef, state, slots: Slots, ids, lengths, slot_idx, req_ids, key, *, capacity, sampling,
            stop_ids) -> Slots:
    """Prompt pass of ``ids [k, P]`` into slots ``slot_idx [k]`` (an index >= S marks a padding row: dropped)."""
    target = graphdef.merge(state)
    max_new = slots.out.shape[1]
    pre = prefill_target(target, ids, lengths, capacity)
    keys = request_keys(key, req_ids)
    first = sample_rows(pre.logits[:, 0], keys, jnp.zeros_like(req_ids), sampling)
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-2,), jnp.int32)
    live = ~jnp.isin(first, stop_arr) & (max_new > 1)
    row_out = jnp.full((ids.shape[0], max_new), -1, jnp.int32).at[:, 0].set(first)

    def put(big, new):
        return big.at[slot_idx].set(new.astype(big.dtype), mode="drop")

    return Slots(cache=jax.tree.map(put, slots.cache, pre.cache), last=put(slots.last, first),
                 count=put(slots.count, jnp.ones_like(first)), live=put(slots.live, live),
                 out=put(slots.out, row_out), keys=put(slots.keys, keys))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "stop_ids", "flat_decode"),
                   donate_argnums=(2,))
def _run(graphdef, state, slots: Slots, refill_at, max_steps, *, sampling, stop_ids, flat_decode=False):
    """Decodes all live slots, one token each per step, while fewer than ``refill_at`` slots are free, some slot
    is live and fewer than ``max_steps`` steps ran. Returns (slots, steps, tokens generated)."""
    target = graphdef.merge(state)
    num_slots, max_new = slots.out.shape
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-2,), jnp.int32)
    rows = jnp.arange(num_slots, dtype=jnp.int32)

    def cond(carry):
        step, s, _ = carry
        return (step < max_steps) & jnp.any(s.live) & (jnp.sum(~s.live) < refill_at)

    def body(carry):
        step, s, made = carry
        tok = jnp.where(s.live, s.last, 0)
        if flat_decode:     # the ragged kernel reads each row's cache in place
            res = target.forward_flat(tok, rows, s.cache.lengths, s.cache)
            logits, cache = res.logits, res.cache
        else:
            res = target(tok[:, None], s.cache)
            logits, cache = res.logits[:, 0], res.cache
        # a finished slot keeps its length: it idles until refilled and never outgrows the capacity
        cache = cache.with_lengths(jnp.where(s.live, s.cache.lengths + 1, s.cache.lengths))
        nxt = sample_rows(logits, s.keys, s.count, sampling)
        at = jnp.where(s.live, s.count, max_new)                  # max_new: out of range, dropped
        out = s.out.at[rows, at].set(nxt, mode="drop")
        count = s.count + s.live
        live = s.live & ~jnp.isin(nxt, stop_arr) & (count < max_new)
        made = made + jnp.sum(s.live)
        return step + 1, Slots(cache, jnp.where(s.live, nxt, s.last), count, live, out, s.keys), made

    steps, slots, made = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, jnp.int32(0)))
    return slots, steps, made


@jax.jit
def take_rows(tree, idx):
    """Rows ``idx`` of every leaf of ``tree`` (batch axis 0)."""
    return jax.tree.map(lambda x: x[idx], tree)


@dataclasses.dataclass
class SlotStats:
    """What a run of the engine did: decode steps (speculative: rounds), slot-steps (steps x slots), busy
    slot-steps (those that advanced a live request; plain decoding: the tokens made by decode steps, first tokens
    coming from the prompt passes), prompt passes, host round trips and seconds."""

    decode_steps: int = 0
    slot_steps: int = 0
    busy_slot_steps: int = 0
    prompt_passes: int = 0
    syncs: int = 0
    seconds: float = 0.0

    @property
    def utilisation(self) -> float:
        """The fraction of slot-steps that advanced a live request."""
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0


def bucketed_indices(idx: list[int]) -> np.ndarray:
    """``idx`` padded to a power-of-two length by repeating its last entry: gathers of finished slots then compile
    once per bucket instead of once per count."""
    return np.asarray(idx + [idx[-1]] * (next_bucket(len(idx), minimum=1) - len(idx)), np.int32)


class SlotEngine:
    """A queue of requests served by ``num_slots`` slots. ``submit`` queues a request (also while :meth:`run` is
    being iterated: a follow-up request, such as a conversation's next turn, joins the queue); :meth:`run` yields
    ``(tag, result)`` for each request as it finishes, until the queue is empty and no slot is live. Prompts may
    be up to ``max_prompt_len`` tokens.

    ``refill_at``: the compiled loop hands back to the host once this many slots are free (default
    ``max(1, num_slots // 8)``); fewer when fewer requests are queued. ``stats`` accumulates over runs.

    ``shrink`` (the drain policy): once the queue is empty (and no follow-ups are expected), the live requests
    are packed into half as many slots each time half of the slots are free, so the last, longest requests do not
    step a full batch of finished slots (one compile per halving; the full size is restored for the next run).

    A subclass holds the device state and provides ``_begin()`` (at the start of each run), ``_empty()``,
    ``_insert(ids, lengths, slot_idx, req_ids)``, ``_run(refill_at) -> (steps, busy slot-steps)``,
    ``_live() -> [S] bool``, ``_harvest(slots) -> results`` and ``_take(idx)`` (keep slots ``idx``, in order)."""

    def __init__(self, *, num_slots: int, max_prompt_len: int, max_new_tokens: int, refill_at: int | None = None,
                 shrink: bool = False):
        for name, v in (("num_slots", num_slots), ("max_prompt_len", max_prompt_len),
                        ("max_new_tokens", max_new_tokens)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_slots = self.full_slots = int(num_slots)
        self.shrink = bool(shrink)
        self.refill_at = max(1, self.num_slots // 8) if refill_at is None else int(refill_at)
        if self.refill_at < 1:
            raise ValueError(f"refill_at must be >= 1, got {refill_at}")
        self.max_prompt_len = int(max_prompt_len)
        self.max_new = int(max_new_tokens)
        self.prompt_bucket = next_bucket(self.max_prompt_len)
        self.stats = SlotStats()
        self.queue: collections.deque = collections.deque()
        self._holder: list = [None] * self.num_slots      # (tag,) of the request each slot holds; None = free
        self._started = False

    def submit(self, request_id: int, tokens: Sequence[int], tag=None) -> None:
        """Queues a prompt (validated token ids). ``request_id`` keys its sampling; ``tag`` comes back with it."""
        if not 0 < len(tokens) <= self.max_prompt_len:
            raise ValueError(f"request {request_id}: prompt of {len(tokens)} tokens; this engine takes 1.."
                             f"{self.max_prompt_len}")
        if not 0 <= int(request_id) < 2**31:
            raise ValueError(f"request_id must lie in [0, 2**31), got {request_id}")
        self.queue.append((int(request_id), list(tokens), tag))

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(h is not None for h in self._holder)

    def run(self, followups: bool = False) -> Iterator[tuple[object, object]]:
        """Yields ``(tag, result)`` per finished request. ``followups``: the caller submits new requests while
        iterating (a conversation's next turn): with the queue empty the compiled loop still hands back once
        ``refill_at`` more slots are free, instead of running until every slot is done."""
        self._begin()
        if not self._started:
            self._empty()
            self._started = True
        st = self.stats
        t0 = time.perf_counter() - st.seconds
        while self.busy:
            free = [s for s in range(self.num_slots) if self._holder[s] is None]
            take = min(len(free), len(self.queue))
            if take:
                admitted = [self.queue.popleft() for _ in range(take)]
                width = min(next_bucket(take, minimum=1), self.num_slots)
                ids, lengths = pad_batch([r[1] for r in admitted] + [[0]] * (width - take))
                slot_idx = np.asarray(free[:take] + [self.num_slots] * (width - take), np.int32)
                req = np.asarray([r[0] for r in admitted] + [0] * (width - take), np.int32)
                self._insert(jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(slot_idx), jnp.asarray(req))
                for s, r in zip(free, admitted):
                    self._holder[s] = (r[2],)
                st.prompt_passes += 1
            if self.queue:     # every free slot was filled: hand back once refill_at of them (or the queue) free up
                threshold = min(self.refill_at, len(self.queue))
            elif followups:    # counted from the slots free now, else a free slot would return at once, forever
                threshold = len(free) - take + self.refill_at
            elif self.shrink and self.num_slots > 1:   # drain: pack the live requests into fewer slots
                live_slots = [s for s in range(self.num_slots) if self._holder[s] is not None]
                if len(live_slots) <= self.num_slots // 2:
                    self._pack(live_slots)
                threshold = self.num_slots - self.num_slots // 2 if self.num_slots > 1 else 2
            else:              # nothing left to admit: run until every slot is done
                threshold = self.num_slots + 1
            steps, busy = self._run(threshold)
            live = self._live()
            st.syncs += 1
            st.decode_steps += int(steps)
            st.slot_steps += int(steps) * self.num_slots
            st.busy_slot_steps += int(busy)
            done = [s for s in range(self.num_slots) if self._holder[s] is not None and not live[s]]
            if done:
                for s, result in zip(done, self._harvest(done)):
                    (tag,) = self._holder[s]
                    self._holder[s] = None
                    st.seconds = time.perf_counter() - t0
                    yield tag, result   # the caller may submit() here
        st.seconds = time.perf_counter() - t0
        if self.num_slots != self.full_slots:    # the next run starts from empty slots of the full size
            self.num_slots = self.full_slots
            self._holder = [None] * self.num_slots
            self._started = False

    def _pack(self, live_slots: list[int]) -> None:
        """Moves the live requests into the first slots of a state of ``next_bucket(len(live_slots))`` slots."""
        size = next_bucket(max(1, len(live_slots)), minimum=1)
        spare = [s for s in range(self.num_slots) if self._holder[s] is None]
        idx = live_slots + spare[:size - len(live_slots)]
        self._take(np.asarray(idx, np.int32))
        self._holder = [self._holder[s] for s in live_slots] + [None] * (size - len(live_slots))
        self.num_slots = size


class PlainSlotEngine(SlotEngine):
    """Plain decoding over refilled slots; a result is the request's new tokens (``[n]`` int32, a stop token
    included). The cache capacity is the prompt bucket + ``max_new_tokens`` (rounded: ``round_capacity``)."""

    def __init__(self, target, *, num_slots: int, max_prompt_len: int, max_new_tokens: int,
                 sampling: SamplingConfig, stop_ids: tuple[int, ...], seed: int = 0, refill_at: int | None = None,
                 flat_decode: bool = False, shrink: bool = False):
        super().__init__(num_slots=num_slots, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                         refill_at=refill_at, shrink=shrink)
        self.capacity = round_capacity(self.prompt_bucket + self.max_new)
        self.target, self.sampling, self.stop_ids, self.flat_decode = target, sampling, tuple(stop_ids), flat_decode
        self.key = jax.random.key(seed)
        self._slots: Slots | None = None

    def _begin(self):
        self._graph = split_static(self.target)

    def _empty(self):
        self._slots = _empty_slots(self.target, self.num_slots, self.capacity, self.max_new)

    def _insert(self, ids, lengths, slot_idx, req):
        graphdef, state = self._graph
        self._slots = _insert(graphdef, state, self._slots, ids, lengths, slot_idx, req, self.key,
                              capacity=self.capacity, sampling=self.sampling, stop_ids=self.stop_ids)

    def _run(self, threshold):
        graphdef, state = self._graph
        self._slots, steps, made = _run(graphdef, state, self._slots, jnp.int32(threshold), jnp.int32(self.max_new),
                                        sampling=self.sampling, stop_ids=self.stop_ids, flat_decode=self.flat_decode)
        self._host = jax.device_get((self._slots.live, self._slots.count))
        return jax.device_get((steps, made))

    def _live(self):
        return self._host[0]

    def _take(self, idx):
        self._slots = take_rows(self._slots, jnp.asarray(idx))

    def _harvest(self, done):
        count = self._host[1]
        out = np.asarray(jax.device_get(self._slots.out[jnp.asarray(bucketed_indices(done))]))
        return [row[:count[s]].copy() for s, row in zip(done, out)]


def stream_generate(target, rows: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingConfig,
                    stop_ids: tuple[int, ...], seed: int, max_slots: int, refill_at: int | None = None,
                    flat_decode: bool = False, stats: SlotStats | None = None,
                    request_ids: Sequence[int] | None = None, shrink: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(i, tokens)`` for request ``i`` of ``rows`` (validated token-id lists) as soon as it finishes;
    ``tokens`` holds its new tokens (a stop token included). At most ``max_slots`` rows decode at once;
    ``request_ids`` (default ``0..n-1``) key the sampling. ``stats`` is filled in as it runs."""
    n = len(rows)
    if n == 0:
        return
    if not isinstance(max_slots, (int, np.integer)) or max_slots < 1:
        raise ValueError(f"max_slots must be a positive int, got {max_slots!r}")
    ids_of = check_request_ids(request_ids, n)
    engine = PlainSlotEngine(target, num_slots=min(int(max_slots), n), max_prompt_len=max(len(r) for r in rows),
                             max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids, seed=seed,
                             refill_at=refill_at, flat_decode=flat_decode, shrink=shrink)
    if stats is not None:
        engine.stats = stats
    for i, r in enumerate(rows):
        engine.submit(int(ids_of[i]), r, tag=i)
    yield from engine.run()


__all__ = ["Slots", "SlotStats", "SlotEngine", "PlainSlotEngine", "bucketed_indices", "take_rows", "stream_generate"]
