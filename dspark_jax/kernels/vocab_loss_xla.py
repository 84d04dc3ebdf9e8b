"""Plain-XLA driver of the fused vocab loss (``vocab_loss_fused(backend="xla")``; not ``impl="xla"``, which is
the autodiff'd scan of :mod:`dspark_jax.kernels.vocab_loss_chunked`).

The same two forward passes and hand-written backward as the Pallas kernels, as a ``fori_loop`` over vocab chunks
with all rows at once: XLA's memory plan can see it on any backend, and it states the kernels' algorithm in
ordinary ops. The last chunk overlaps the one before it (no padding of the ``[V, H]`` weights); the overlapped
columns are masked. Plain XLA ops, so the SPMD partitioner shards it itself (no ``custom_partitioning``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dspark_jax.kernels.vocab_loss_common import (
    F32,
    _argmax_update,
    _capped,
    _dot,
    _dot_nt,
    _logit_grads,
    _online,
    _pass2_terms,
)


def _as_bits(w):
    """16-bit floats are sliced as uint16: XLA:CPU upcasts a bf16 dynamic-slice's operand and hoists that
    whole-array convert out of the loop (a [V, H] fp32 temporary). Forward-only (gradients are explicit)."""
    return lax.bitcast_convert_type(w, jnp.uint16) if w.dtype.itemsize == 2 else w


def _xla_chunk(cfg, j, hd, ht, u, wb, w2b, dtype):
    """Chunk j: vocab rows [start, start+tv) with start clamped so the last chunk ends at V; the columns an
    earlier chunk covered are masked (-inf, and a column id of -1 so no label matches)."""
    start = jnp.minimum(j * cfg.tv, cfg.vocab - cfg.tv)

    def take(wb_):
        c = lax.dynamic_slice_in_dim(wb_, start, cfg.tv, axis=0)
        return lax.bitcast_convert_type(c, dtype) if c.dtype == jnp.uint16 else c

    wc = take(wb)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, cfg.tv), 1)
    valid = cols >= j * cfg.tv
    neg = jnp.where(valid, 0.0, -jnp.inf).astype(F32)
    d, jd = _capped(_dot_nt(hd, wc, cfg.hp), cfg.softcap)
    w2c = None
    if u is not None:
        w2c = take(w2b)
        d = d + _dot_nt(u, w2c, cfg.hp)
    t, jt = _capped(_dot_nt(ht, wc, cfg.hp), cfg.softcap)
    return d + neg, t + neg, jnp.where(valid, cols, -1), wc, w2c, start, (jd, jt)


def _xla_forward(cfg, hd, ht, u, w, w2, ids):
    """As :func:`dspark_jax.kernels.vocab_loss_tpu._tpu_forward`."""
    rows = hd.shape[0]
    wb, w2b = _as_bits(w), (None if u is None else _as_bits(w2))
    nv = pl.cdiv(cfg.vocab, cfg.tv)
    lbl = None if cfg.soft else ids[:, None]

    def lse_body(j, carry):
        md, sd, mt, st, xd, xt = carry
        d, t, cols, _, _, _, _ = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        if cfg.soft:
            xd, xt = _argmax_update(md, xd, d, cols), _argmax_update(mt, xt, t, cols)
        return (*_online(md, sd, d), *_online(mt, st, t), xd, xt)

    ninf, zero = jnp.full((rows, 1), -jnp.inf, F32), jnp.zeros((rows, 1), F32)
    md, sd, mt, st, xd, xt = lax.fori_loop(0, nv, lse_body, (ninf, zero, ninf, zero, zero, zero))
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)

    def l1_body(j, carry):
        d, t, cols, _, _, _, _ = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        return tuple(c + v for c, v in zip(carry, _pass2_terms(cfg.soft, d, t, cols, lbl, lse_d, lse_t)))

    l1, ad, at, tg = lax.fori_loop(0, nv, l1_body, (zero,) * 4)
    first = lambda a: a[:, 0]  # noqa: E731
    return tuple(map(first, (lse_d - tg, l1, lse_d, lse_t, ad, at, tg) + ((xd, xt) if cfg.soft else ())))


def _xla_backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1):
    wb, w2b = _as_bits(w), (None if u is None else _as_bits(w2))
    col = lambda v: v[:, None]  # noqa: E731
    lse_d, lse_t, ad, at = map(col, stats)
    need_t = need["ht"] or need["w"]
    init = {n: jnp.zeros(x.shape, F32) for n, x in (("hd", hd), ("u", u), ("ht", ht), ("w", w), ("w2", w2))
            if need[n]}

    def body(j, acc):
        d, t, cols, wc, w2c, start, jac = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        g_d, g_dh, g_t = _logit_grads(d, t, cols, col(lbl), lse_d, lse_t, ad, at, col(dce), col(dl1), need_t, jac,
                                      cfg.soft)
        acc = dict(acc)
        if "hd" in acc:
            acc["hd"] = acc["hd"] + _dot(g_dh.astype(wc.dtype), wc, cfg.hp)
        if "u" in acc:
            acc["u"] = acc["u"] + _dot(g_d.astype(w2c.dtype), w2c, cfg.hp)
        if "ht" in acc:
            acc["ht"] = acc["ht"] + _dot(g_t.astype(wc.dtype), wc, cfg.hp)
        for n, terms in (("w", ((g_dh, hd), (g_t, ht))), ("w2", ((g_d, u),))):
            if n in acc:
                upd = sum(_dot(g.T.astype(a.dtype), a, cfg.hp) for g, a in terms)
                cur = lax.dynamic_slice_in_dim(acc[n], start, cfg.tv, axis=0)
                acc[n] = lax.dynamic_update_slice_in_dim(acc[n], cur + upd, start, axis=0)
        return acc

    out = lax.fori_loop(0, pl.cdiv(cfg.vocab, cfg.tv), body, init)
    return {n: out.get(n) for n in ("hd", "ht", "u", "w", "w2")}
