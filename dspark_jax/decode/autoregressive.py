"""Plain autoregressive generation: the baseline every speculative speed-up is measured against.

One jitted program per (batch, prompt bucket, max_new_tokens, sampling) shape: prefill, then a
``lax.while_loop`` that decodes one token per row per step with no host round trip, stopping early
once every row has emitted a stop token.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.cache import round_capacity
from dspark_jax.decode.output import GenerationOutput
from dspark_jax.decode.prefill import prefill as prefill_target
from dspark_jax.decode.prompts import check_request_ids, encode_prompts, pad_batch
from dspark_jax.decode.sampling import SamplingConfig, request_keys, sample_rows
from dspark_jax.decode.slots import PlainSlotEngine, SlotStats, stream_generate
from dspark_jax.kernels._dispatch import resolve as resolve_impl
from dspark_jax.nn.static_graph import split_static


def generate(target, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int = 0,
             max_slots: int | None = None, refill_at: int | None = None,
             request_ids: Sequence[int] | None = None, shrink: bool = False) -> GenerationOutput:
    """Generates up to ``max_new_tokens`` per prompt with the target alone.

    Args:
      target: a target model (``dj.load_target``).
      prompts: list of token-id lists (or strings when the target has a tokenizer), any lengths.
      temperature, top_k, top_p: sampling (temperature 0 = greedy).
      stop_token_ids: a row stops after emitting one of these (it is kept in the output);
        None = the config's ``eos_token_id``; ``()`` = never stop early.
      seed: PRNG seed; same seed, same output. Each prompt samples with its own key (the seed and its request
        id), so its output does not depend on the other prompts or on ``max_slots``.
      max_slots: None = all prompts in one static batch; an int = at most that many rows decode at once and the
        prompts form a queue: a finished row's slot takes the next prompt (continuous batching, decode/slots.py).
      refill_at: with ``max_slots``: hand back to the host to refill once this many slots are free (default
        ``max(1, max_slots // 8)``).
      request_ids: one int per prompt, folded into its sampling key (default: its index). A stable id (e.g. of
        a dataset record) makes a sampled output reproducible however the prompts are batched or resumed.
      shrink: with ``max_slots``: once the queue is empty, pack the live rows into half as many slots each time
        half are free (decode/slots.py's drain policy; same tokens, one compile per halving).
    Returns:
      :class:`GenerationOutput` (tokens ``[B, max_new_tokens]`` padded with -1, lengths, stats).
    """
    sampling, rows, stops = _requests(target, prompts, max_new_tokens, temperature, top_k, top_p, stop_token_ids)
    req = check_request_ids(request_ids, len(rows))
    if max_slots is not None:
        return _generate_slots(target, prompts, rows, max_new_tokens, sampling, stops, seed, max_slots, refill_at,
                               req, shrink)
    ids, lengths = pad_batch(rows)
    graphdef, state = split_static(target)
    t0 = time.perf_counter()
    tokens, n_new, steps = _generate_jit(graphdef, state, np.asarray(ids, np.int32), np.asarray(lengths, np.int32),
                                         jax.random.key(seed), np.asarray(req, np.int32),
                                         max_new_tokens=int(max_new_tokens),
                                         capacity=generate_capacity(ids.shape[1], max_new_tokens),
                                         sampling=sampling, stop_ids=stops, flat_decode=_decodes_flat(target))
    tokens, n_new, steps = jax.device_get((tokens, n_new, steps))   # all the call returns, inside its time
    seconds = time.perf_counter() - t0
    tokens, n_new = np.asarray(tokens), np.asarray(n_new)
    stats = {"seconds": seconds, "new_tokens": int(n_new.sum()), "tokens_per_s": float(n_new.sum() / seconds),
             "decode_steps": int(steps), "batch": len(rows)}
    return GenerationOutput(tokens=tokens, lengths=n_new, stats=stats, texts=_texts(target, prompts, tokens, n_new))


def generate_stream(target, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int = 0,
                    max_slots: int = 16, refill_at: int | None = None,
                    request_ids: Sequence[int] | None = None) -> Iterator[tuple[int, list[int]]]:
    """:func:`generate` with a queue of ``max_slots`` slots, yielding ``(index, new_tokens)`` for each prompt as
    soon as it finishes (not in prompt order), for jobs that write results as they come. Same tokens as
    :func:`generate` with the same arguments."""
    sampling, rows, stops = _requests(target, prompts, max_new_tokens, temperature, top_k, top_p, stop_token_ids)
    for i, toks in stream_generate(target, rows, max_new_tokens=int(max_new_tokens), sampling=sampling,
                                   stop_ids=stops, seed=seed, max_slots=max_slots, refill_at=refill_at,
                                   flat_decode=_decodes_flat(target),
                                   request_ids=check_request_ids(request_ids, len(rows))):
        yield i, toks.tolist()


def slot_engine(target, *, num_slots: int, max_prompt_len: int, max_new_tokens: int, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int = 0,
                refill_at: int | None = None, shrink: bool = False) -> PlainSlotEngine:
    """A :class:`~dspark_jax.decode.slots.PlainSlotEngine` with :func:`generate`'s arguments, for jobs that feed
    requests as they go (``engine.submit`` while iterating ``engine.run(followups=True)``); each request's
    tokens equal :func:`generate`'s for the same seed and request id."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    stops = tuple(target.config.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    return PlainSlotEngine(target, num_slots=num_slots, max_prompt_len=max_prompt_len,
                           max_new_tokens=int(max_new_tokens), sampling=SamplingConfig(float(temperature), int(top_k),
                                                                                       float(top_p)),
                           stop_ids=stops, seed=seed, refill_at=refill_at, flat_decode=_decodes_flat(target),
                           shrink=shrink)


def _requests(target, prompts, max_new_tokens, temperature, top_k, top_p, stop_token_ids):
    """Validated (sampling, token-id rows, stop ids) of a generate call."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    cfg = target.config
    rows = encode_prompts(prompts, getattr(target, "tokenizer", None), cfg.vocab_size)
    stops = tuple(cfg.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    return sampling, rows, stops


def _texts(target, prompts, tokens, n_new):
    tok = getattr(target, "tokenizer", None)
    if tok is not None and any(isinstance(p, str) for p in prompts):
        return [tok.decode(r[:n].tolist()) for r, n in zip(tokens, n_new)]
    return None


def _generate_slots(target, prompts, rows, max_new_tokens, sampling, stops, seed, max_slots, refill_at, req,
                    shrink):
    stats = SlotStats()
    tokens = np.full((len(rows), int(max_new_tokens)), -1, np.int32)
    n_new = np.zeros(len(rows), np.int64)
    for i, toks in stream_generate(target, rows, max_new_tokens=int(max_new_tokens), sampling=sampling,
                                   stop_ids=stops, seed=seed, max_slots=max_slots, refill_at=refill_at,
                                   flat_decode=_decodes_flat(target), stats=stats, request_ids=req,
                                   shrink=shrink):
        tokens[i, :len(toks)] = toks
        n_new[i] = len(toks)
    total = int(n_new.sum())
    info = {"seconds": stats.seconds, "new_tokens": total, "tokens_per_s": total / max(stats.seconds, 1e-9),
            "decode_steps": stats.decode_steps, "batch": len(rows), "slots": min(int(max_slots), len(rows)),
            "slot_utilisation": stats.utilisation, "prompt_passes": stats.prompt_passes, "syncs": stats.syncs}
    return GenerationOutput(tokens=tokens, lengths=n_new, stats=info, texts=_texts(target, prompts, tokens, n_new))


def _decodes_flat(target) -> bool:
    """Whether the decode step goes through ``forward_flat`` (the ragged attention kernel): when the target's
    attention resolves to Pallas. Resolved here, outside jit, so ``$DSPARK_KERNEL_IMPL`` is read per call."""
    if not hasattr(target, "forward_flat"):
        return False
    impl = getattr(target.layers[0].self_attn, "attention_impl", "auto")
    return resolve_impl(impl, "ragged_attention")[0] == "pallas"


def generate_capacity(prompt_width: int, max_new_tokens: int) -> int:
    """The plain decode loop's cache slots: the padded prompt and every new token, rounded up as
    :func:`~dspark_jax.cache.round_capacity` says (each step attends over the whole capacity)."""
    return round_capacity(int(prompt_width) + int(max_new_tokens))


def decode_steps(target, last, cache, out, done, keys, step, end, sampling: SamplingConfig, stop_arr,
                 flat_decode: bool = False):
    """The plain decode loop (traced): from step ``step`` (int32; ``out[:, step-1]`` holds ``last [B]``) until
    step ``end`` or every row is done, one target forward per step over each row's last token, a token sampled
    with the row's key at that step and written to ``out [B, W]`` (-1 once a row is done). Returns (steps reached,
    out, cache). :func:`generate` runs it after the prefill; the round profile times it as the plain step that
    an all-plain call runs (decode/profile.py)."""
    batch = last.shape[0]

    def cond(carry):
        step, _, _, _, done = carry
        return (step < end) & ~jnp.all(done)

    def step_dense(tok, cache):                     # -> (logits [B, 1, V], cache)
        res = target(tok[:, None], cache)
        return res.logits, res.cache

    def step_flat(tok, cache):
        # one query token per row at its cache length: the ragged kernel reads each row's cache in place instead
        # of a dense [B, 1, C] masked attention
        res = target.forward_flat(tok, jnp.arange(batch, dtype=jnp.int32), cache.lengths, cache)
        return res.logits[:, None], res.cache.with_lengths(cache.lengths + 1)

    decode_step = step_flat if flat_decode else step_dense

    def body(carry):
        step, last, cache, out, done = carry
        logits, cache = decode_step(jnp.where(done, 0, last), cache)
        nxt = sample_rows(logits[:, 0], keys, jnp.full((batch,), step, jnp.int32), sampling)
        nxt = jnp.where(done, -1, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, cache, out, done | jnp.isin(nxt, stop_arr)

    steps, _, cache, out, _ = jax.lax.while_loop(cond, body, (step, last, cache, out, done))
    return steps, out, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "capacity", "sampling", "stop_ids",
                                             "flat_decode"))
def _generate_jit(graphdef, state, ids, lengths, key, req_ids, *, max_new_tokens, capacity, sampling, stop_ids,
                  flat_decode=False):
    target = graphdef.merge(state)
    batch = ids.shape[0]
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-2,), jnp.int32)

    prefill = prefill_target(target, ids, lengths, capacity)
    keys = request_keys(key, req_ids)                 # as decode/slots.py: each request samples with its own key
    first = sample_rows(prefill.logits[:, 0], keys, jnp.zeros((batch,), jnp.int32), sampling)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_arr)
    steps, out, _ = decode_steps(target, first, prefill.cache, out, done, keys, jnp.int32(1), max_new_tokens,
                                 sampling, stop_arr, flat_decode)
    n_new = jnp.sum(out >= 0, axis=1)
    return out, n_new, steps
