"""Pieces of the fused vocab loss (:func:`dspark_jax.kernels.vocab_loss.vocab_loss_fused`) shared by its drivers.

* the per-call configuration :class:`_Cfg` (driver, tiles, precision, softcap, soft targets), built by
  :func:`_make_cfg` from the default tiles below and fitted to each row shard by :func:`_fit_rows`;
* the tile math every driver runs on a ``[tr, tv]`` tile of logits (row vectors are ``[tr, 1]``): the online
  log-sum-exp, the first-occurrence argmax, the pass-2 sums, the softcap and its derivative, the logit gradients,
  fp32-accumulating dots (also used by :mod:`dspark_jax.kernels.vocab_loss_dense`);
* :func:`_split_refs`, naming a Pallas kernel's positional refs (TPU and GPU kernels).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
# (rows, vocab) per grid step; the dX kernel then holds ~11 MB of VMEM at H=2560 bf16 (double-buffered
# inputs, the resident fp32 [128, H] accumulator, [128, 256] fp32 intermediates): under a 16 MiB scoped default
TPU_TILES = (128, 256)
GPU_TILES = (64, 64, 64)  # (rows, vocab, hidden chunk); powers of two for Triton
XLA_VOCAB_TILE = 2048    # vocab rows per step of the plain-XLA driver


# ---- configuration and tiles --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Cfg:
    kind: str        # "tpu" | "gpu" | "xla"
    interpret: bool
    tr: int          # rows per tile (requested; fitted to each shard's rows by _fit_rows)
    tv: int          # vocab rows per tile
    vocab: int
    hc: int          # GPU: hidden / rank columns per inner step
    hp: bool         # fp32 operands: full-precision dots
    softcap: float | None = None   # cap on the lm_head logits (before the Markov bias)
    soft: bool = False             # soft targets (Eagle3): CE against p_t, argmax match; no label ids


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit_rows(cfg: _Cfg, rows: int) -> _Cfg:
    """The row tile for ``rows`` rows: a shard's, not the global count, so a small shard is not padded to a tile
    sized for the whole batch."""
    if cfg.kind == "tpu":
        tr = min(cfg.tr, _round_up(rows, 8))
    elif cfg.kind == "gpu":
        tr = min(cfg.tr, max(16, _next_pow2(rows)))
    else:
        tr = rows
    return dataclasses.replace(cfg, tr=int(tr))


def _make_cfg(backend, rows, vocab, hidden, rank, dt, row_tile, vocab_tile, softcap, soft):
    kind, _, mode = backend.partition("-")
    if kind not in ("tpu", "gpu", "xla") or mode not in ("", "interpret") or (kind == "xla" and mode):
        raise ValueError(f"vocab_loss_fused backend={backend!r}: expected tpu|gpu[-interpret] or xla")
    if kind == "xla":          # all rows at once, a loop over vocab chunks (the last one overlaps, no padding)
        tr, tv, hc = rows, min(vocab_tile or XLA_VOCAB_TILE, vocab), hidden
    elif kind == "tpu":
        tr, tv = row_tile or TPU_TILES[0], vocab_tile or TPU_TILES[1]
        tv = vocab if vocab <= tv else tv
        hc = hidden
    else:
        tr, tv, hc = row_tile or GPU_TILES[0], vocab_tile or GPU_TILES[1], GPU_TILES[2]
        tv = min(tv, max(16, _next_pow2(vocab)))
        hc = min(hc, max(16, _next_pow2(max(hidden, rank))))
    return _Cfg(kind, mode == "interpret", int(tr), int(tv), int(vocab), int(hc), jnp.dtype(dt) == jnp.float32,
                None if softcap is None else float(softcap), soft)



# ---- tile math shared by the drivers (row vectors are [tr, 1]) --------------------------------------------------
def _sign(x):
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0)).astype(F32)


def _online(m, s, x):
    """Running max/sum update of ``logsumexp`` with one ``[tr, tv]`` chunk (``-inf`` = masked column)."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=True))
    s_new = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new), axis=1, keepdims=True)
    return m_new, s_new


def _argmax_update(m, arg, x, cols):
    """First-occurrence argmax over the chunks seen so far (``jnp.argmax``'s tie rule), given the running max
    ``m`` *before* this chunk. Indices are fp32 (exact below 2^24) so every driver keeps float row vectors."""
    cmax = jnp.max(x, axis=1, keepdims=True)
    carg = jnp.min(jnp.where(x == cmax, cols.astype(F32), jnp.inf), axis=1, keepdims=True)
    return jnp.where(cmax > m, carg, arg)


def _pass2_terms(soft, d, t, cols, lbl, lse_d, lse_t):
    """Per-chunk sums of pass 2: ``(L1, a_d, a_t, tg)``; ``tg`` is the label logit ``d[y]`` (``lbl`` = ids), or
    with soft targets ``sum_v p_t d`` (``lbl`` unused). Either way ``CE = lse_d - tg``."""
    p_d, p_t = jnp.exp(d - lse_d), jnp.exp(t - lse_t)
    diff = p_d - p_t
    sg = _sign(diff)
    s = functools.partial(jnp.sum, axis=1, keepdims=True)
    if soft:   # masked columns are d = t = -inf, p_t = 0: keep 0 * -inf out of the sum
        tg = s(jnp.where(p_t > 0, p_t * d, 0.0))
    else:
        tg = s(jnp.where(cols == lbl, d, 0.0))
    return s(jnp.abs(diff)), s(p_d * sg), s(p_t * sg), tg


def _capped(z, cap):
    """``(cap * tanh(z / cap), 1 - tanh^2)`` of raw ``lm_head`` logits; ``(z, None)`` without a cap. The
    derivative is kept for the backward (unused values are dropped from the forward kernels)."""
    if cap is None:
        return z, None
    th = jnp.tanh(z / cap)
    return cap * th, 1.0 - th * th


def _logit_grads(d, t, cols, lbl, lse_d, lse_t, a_d, a_t, dce, dl1, need_t, jac=(None, None), soft=False):
    """Returns ``(g_d, g_dh, g_t)``: the gradient of the draft logits (what the Markov term receives), of the
    draft's raw ``lm_head`` logits (``g_d`` through the softcap's derivative ``jac[0]``) and of the target's raw
    logits. ``lbl``: the label ids, or with ``soft`` the forward's ``tg = sum_v p_t d``."""
    p_d, p_t = jnp.exp(d - lse_d), jnp.exp(t - lse_t)
    sg = _sign(p_d - p_t)
    target = p_t if soft else (cols == lbl).astype(F32)
    g_d = dl1 * p_d * (sg - a_d) + dce * (p_d - target)
    g_t = None
    if need_t:
        g_t = dl1 * p_t * (a_t - sg)
        if soft:   # d(-sum_v p_t d)/dt_v = -p_t,v (d_v - tg); masked columns (p_t = 0, d = -inf) give 0
            g_t = g_t - dce * jnp.where(p_t > 0, p_t * (d - lbl), 0.0)
    jd, jt = jac
    g_dh = g_d if jd is None else g_d * jd
    if g_t is not None and jt is not None:
        g_t = g_t * jt
    return g_d, g_dh, g_t


def _dot_nt(a, b, hp):
    """``a [m, k] @ b [n, k]^T`` with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32,
                           precision=lax.Precision.HIGHEST if hp else None)


def _dot(a, b, hp):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32,
                           precision=lax.Precision.HIGHEST if hp else None)


# ---- Pallas kernels' refs ---------------------------------------------------------------------------------------
def _split_refs(refs, names):
    it = iter(refs)
    return {n: (next(it) if present else None) for n, present in names}
