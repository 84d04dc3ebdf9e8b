"""Token sampling: greedy, temperature, top-k, top-p (applied in transformers' order)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GREEDY_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (a change recompiles the decode loop; these rarely change per call).

    ``temperature < 1e-5`` means greedy (argmax); ``top_k = 0`` and ``top_p = 1`` disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def warp_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``[..., V]`` logits -> fp32 logits of the distribution actually sampled from (-inf outside the filters)."""
    x = logits.astype(jnp.float32) / max(cfg.temperature, GREEDY_EPS)
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        top = top_k_values(x, cfg.top_k)                            # [..., k], descending
        x = jnp.where(x < top[..., -1:], -jnp.inf, x)
        if cfg.top_p < 1.0:
            # the nucleus lies among the top-k survivors, so rank only those instead of sorting the vocabulary
            # (a sort of 151,936 logits costs ~40 ms a row on a CPU); the normaliser runs over every survivor,
            # ties with the k-th value included, as the full sort's softmax does
            z = jnp.sum(jnp.exp(x - top[..., :1]), axis=-1, keepdims=True)
            x = _nucleus(x, top, jnp.exp(top - top[..., :1]) / z, cfg.top_p)
        return x
    if cfg.top_p < 1.0:
        sorted_x = -jnp.sort(-x, axis=-1)
        x = _nucleus(x, sorted_x, jax.nn.softmax(sorted_x, axis=-1), cfg.top_p)
    return x


def top_k_values(x: jax.Array, k: int) -> jax.Array:
    """``jax.lax.top_k(x, k)[0]``: the ``k`` largest values along the last axis, descending, ties repeated.

    On a CPU it is found by ``k`` rounds of (max, count of that max, mask it out) instead: XLA:CPU's TopK costs
    ~230 us a row for k=20 of 2,048 logits (3.7 ms a step for a batch of 16 on the 2-core CPU this was measured
    on, 80% of a sampled decode step), the rounds ~15x less. Same values for inputs without NaN."""
    if jax.default_backend() != "cpu":
        return jax.lax.top_k(x, k)[0]
    slot = jax.lax.broadcasted_iota(jnp.int32, x.shape[:-1] + (k,), x.ndim - 1)

    def one_round(_, carry):
        rest, values, filled = carry                                # filled: [...] slots of `values` written
        m = jnp.max(rest, axis=-1, keepdims=True)
        hit = rest == m
        n = jnp.sum(hit, axis=-1, keepdims=True, dtype=jnp.int32)   # ties: the value fills n slots
        values = jnp.where((slot >= filled) & (slot < filled + n), m, values)
        return jnp.where(hit, -jnp.inf, rest), values, filled + n

    init = (x, jnp.full(slot.shape, -jnp.inf, x.dtype), jnp.zeros(x.shape[:-1] + (1,), jnp.int32))
    return jax.lax.fori_loop(0, k, one_round, init)[1]


def _nucleus(x, ranked, probs, top_p: float):
    """Keeps the logits of ``x`` not below the smallest ``ranked`` (descending) value whose preceding mass
    ``probs`` is < top_p (the top one always is: nothing precedes it)."""
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < cutoff, -jnp.inf, x)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """``jax.random.categorical(key, logits, axis=-1)`` (Gumbel-max: the same noise, so the same samples) with the
    argmax of :func:`argmax_last`: 5x faster on a CPU at V=151,936. ``key`` may also be one key per row
    (``[B]`` for ``[B, ..., V]`` logits): each row then draws from its own key (see :func:`row_keys`)."""
    return argmax_last(logits + gumbel(key, logits.shape, logits.dtype))


def gumbel(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """``jax.random.gumbel`` for one key, or for ``[B]`` row keys (row ``b`` of the result from ``key[b]``)."""
    if key.ndim == 0:
        return jax.random.gumbel(key, shape, dtype)
    return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], dtype))(key)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform`` for one key, or for ``[B]`` row keys (row ``b`` of the result from ``key[b]``)."""
    if key.ndim == 0:
        return jax.random.uniform(key, shape)
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)


def split_keys(key: jax.Array, num: int) -> jax.Array:
    """``jax.random.split(key, num)`` -> ``[num]``, or for ``[B]`` row keys ``[num, B]`` (each row split on its
    own), so ``keys[i]`` is the i-th key of every row either way."""
    if key.ndim == 0:
        return jax.random.split(key, num)
    return jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(key)


def argmax_last(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 (the first maximal index), computed as a max then a min over the
    indices that reach it. XLA's CPU backend runs argmax as a variadic (value, index) reduction that is not
    vectorised: 10 us for 2,048 logits and ~710 us for 151,936 on the 2-core CPU this was measured on, against
    3 and 45 us for the two plain reductions (``scripts/bench_sampling.py``); accelerators are unaffected.
    A row with a NaN yields the last index (``jnp.argmax`` would give the NaN's), a row of all ``-inf`` index 0."""
    m = jnp.max(x, axis=-1, keepdims=True)
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == m, idx, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)


def sample_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``[B, V]`` logits -> ``[B]`` int32 tokens; ``key`` is one key or ``[B]`` row keys."""
    if cfg.greedy:
        return argmax_last(logits)
    return categorical(key, warp_logits(logits, cfg))


def request_keys(key: jax.Array, request_ids: jax.Array) -> jax.Array:
    """``[R]`` per-request keys from one call key: request ``r``'s samples depend on (key, r) only, never on which
    requests share its batch, its row or when it was admitted (continuous batching)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, request_ids)


def sample_rows(logits: jax.Array, keys: jax.Array, positions: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``[B, V]`` logits, ``[B]`` request keys, ``[B]`` index of the token being sampled in each request's output
    -> ``[B]`` int32 tokens: row ``b`` samples with ``fold_in(keys[b], positions[b])``."""
    if cfg.greedy:
        return argmax_last(logits)
    return categorical(jax.vmap(jax.random.fold_in)(keys, positions), warp_logits(logits, cfg))
