"""GPU (Triton) driver of the fused vocab loss: Pallas kernels for the two forward passes and the backward.

A 1-D grid over the non-reduced axis (row tiles for the forward and dX, vocab tiles for dW); the reduced axis and
the hidden / rank columns (``cfg.hc`` at a time) are looped inside the kernel, with masked loads and stores, so
the ``[V, H]`` weights are never padded. Compiled with Triton on GPU; ``cfg.interpret`` runs the same kernels in
Pallas interpret mode on any backend. Called per row shard by :mod:`dspark_jax.kernels.vocab_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from dspark_jax.kernels.vocab_loss_common import (
    F32,
    _argmax_update,
    _capped,
    _dot,
    _dot_nt,
    _logit_grads,
    _online,
    _pass2_terms,
    _split_refs,
)


def _gpu_call(cfg, kernel, grid, out_shape):
    params = None
    if not cfg.interpret:
        params = pltr.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=cfg.interpret, compiler_params=params)


def _gpu_load(ref, r0, nr, c0, nc, rmax, cmax, dtype=None):
    """Masked ``ref[r0:r0+nr, c0:c0+nc]`` (zeros outside ``[:rmax, :cmax]``)."""
    rmask = (r0 + jnp.arange(nr)) < rmax
    cmask = (c0 + jnp.arange(nc)) < cmax
    return pltr.load(ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], mask=rmask[:, None] & cmask[None, :], other=0)


def _gpu_add(ref, r0, nr, c0, nc, rmax, cmax, val):
    """Masked ``ref[r0:r0+nr, c0:c0+nc] += val``."""
    mask = ((r0 + jnp.arange(nr)) < rmax)[:, None] & ((c0 + jnp.arange(nc)) < cmax)[None, :]
    idx = (pl.ds(r0, nr), pl.ds(c0, nc))
    cur = pltr.load(ref.at[idx], mask=mask, other=0.0)
    pltr.store(ref.at[idx], cur + val, mask=mask)


def _gpu_zero(ref, r0, nr, rmax, width, hc):
    """Masked ``ref[r0:r0+nr, :width] = 0``."""
    def body(k, c):
        c0 = k * hc
        mask = ((r0 + jnp.arange(nr)) < rmax)[:, None] & ((c0 + jnp.arange(hc)) < width)[None, :]
        pltr.store(ref.at[pl.ds(r0, nr), pl.ds(c0, hc)], jnp.zeros((nr, hc), F32), mask=mask)
        return c

    lax.fori_loop(0, pl.cdiv(width, hc), body, 0)


def _gpu_tile_logits(cfg, x, r0, v0, need_t=True):
    """fp32 logits of rows ``[r0, r0+tr)`` x vocab ``[v0, v0+tv)``, masked columns at ``-inf``; returns
    (d, t, cols, softcap derivatives (jd, jt))."""
    tr, tv, hc, vocab = cfg.tr, cfg.tv, cfg.hc, cfg.vocab
    hidden = x["hd"].shape[1]

    def hbody(k, acc):
        d, t = acc
        c0 = k * hc
        wk = _gpu_load(x["w"], v0, tv, c0, hc, vocab, hidden)
        d = d + _dot_nt(_gpu_load(x["hd"], r0, tr, c0, hc, r0 + tr, hidden), wk, cfg.hp)
        if need_t:
            t = t + _dot_nt(_gpu_load(x["ht"], r0, tr, c0, hc, r0 + tr, hidden), wk, cfg.hp)
        return d, t

    z = jnp.zeros((tr, tv), F32)
    d, t = lax.fori_loop(0, pl.cdiv(hidden, hc), hbody, (z, z))
    d, jd = _capped(d, cfg.softcap)
    t, jt = _capped(t, cfg.softcap) if need_t else (t, None)
    if x["u"] is not None:
        rank = x["u"].shape[1]

        def rbody(k, d):
            c0 = k * hc
            return d + _dot_nt(_gpu_load(x["u"], r0, tr, c0, hc, r0 + tr, rank),
                               _gpu_load(x["w2"], v0, tv, c0, hc, vocab, rank), cfg.hp)

        d = lax.fori_loop(0, pl.cdiv(rank, hc), rbody, d)
    cols = v0 + jnp.arange(tv)[None, :]
    neg = jnp.where(cols < vocab, 0.0, -jnp.inf).astype(F32)
    return d + neg, (t + neg if need_t else None), cols, (jd, jt)


def _gpu_vec(ref, r0, tr):
    return ref[pl.ds(r0, tr)][:, None]


def _gpu_forward(cfg, hd, ht, u, w, w2, ids):
    """As :func:`dspark_jax.kernels.vocab_loss_tpu._tpu_forward`."""
    rows = hd.shape[0]
    has_u = u is not None
    tr, tv = cfg.tr, cfg.tv
    nv = pl.cdiv(cfg.vocab, tv)
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else [])
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)]
    vec_shape = jax.ShapeDtypeStruct((rows,), F32)
    lse_outs = ["lse_d", "lse_t"] + (["xd", "xt"] if cfg.soft else [])

    def lse_kernel(*refs):
        x = _split_refs(refs, names + [(n, True) for n in lse_outs])
        r0 = pl.program_id(0) * tr

        def body(jv, carry):
            md, sd, mt, st, xd, xt = carry
            d, t, cols, _ = _gpu_tile_logits(cfg, x, r0, jv * tv)
            if cfg.soft:
                xd, xt = _argmax_update(md, xd, d, cols), _argmax_update(mt, xt, t, cols)
            md, sd = _online(md, sd, d)
            mt, st = _online(mt, st, t)
            return md, sd, mt, st, xd, xt

        ninf, zero = jnp.full((tr, 1), -jnp.inf, F32), jnp.zeros((tr, 1), F32)
        md, sd, mt, st, xd, xt = lax.fori_loop(0, nv, body, (ninf, zero, ninf, zero, zero, zero))
        x["lse_d"][pl.ds(r0, tr)] = (md + jnp.log(sd))[:, 0]
        x["lse_t"][pl.ds(r0, tr)] = (mt + jnp.log(st))[:, 0]
        if cfg.soft:
            x["xd"][pl.ds(r0, tr)] = xd[:, 0]
            x["xt"][pl.ds(r0, tr)] = xt[:, 0]

    lse_d, lse_t, *am = _gpu_call(cfg, lse_kernel, (rows // tr,), [vec_shape] * len(lse_outs))(*ins)

    def l1_kernel(*refs):
        x = _split_refs(refs, names + [("ids", not cfg.soft)] + [
            (n, True) for n in ("lse_d", "lse_t", "l1", "ad", "at", "tg")])
        r0 = pl.program_id(0) * tr
        ld, lt = (_gpu_vec(x[n], r0, tr) for n in ("lse_d", "lse_t"))
        lbl = None if cfg.soft else _gpu_vec(x["ids"], r0, tr)

        def body(jv, carry):
            d, t, cols, _ = _gpu_tile_logits(cfg, x, r0, jv * tv)
            return tuple(c + v for c, v in zip(carry, _pass2_terms(cfg.soft, d, t, cols, lbl, ld, lt)))

        zero = jnp.zeros((tr, 1), F32)
        res = lax.fori_loop(0, nv, body, (zero,) * 4)
        for n, v in zip(("l1", "ad", "at", "tg"), res):
            x[n][pl.ds(r0, tr)] = v[:, 0]

    lbl_in = [] if cfg.soft else [ids]
    l1, ad, at, tg = _gpu_call(cfg, l1_kernel, (rows // tr,), [vec_shape] * 4)(*ins, *lbl_in, lse_d, lse_t)
    return (lse_d - tg, l1, lse_d, lse_t, ad, at, tg, *am)


def _gpu_backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1):
    rows, hidden = hd.shape
    has_u = u is not None
    r = u.shape[1] if has_u else 0
    tr, tv, hc, vocab = cfg.tr, cfg.tv, cfg.hc, cfg.vocab
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else []) + [lbl, *stats, dce, dl1]
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)] + [
        (n, True) for n in ("lbl", "lse_d", "lse_t", "ad", "at", "dce", "dl1")]
    need_t = need["ht"] or need["w"]
    grads = dict.fromkeys(("hd", "ht", "u", "w", "w2"))
    width = {"hd": hidden, "u": r, "ht": hidden, "w": hidden, "w2": r}
    src = {"hd": "w", "ht": "w", "u": "w2"}

    def tile(x, r0, v0):
        d, t, cols, jac = _gpu_tile_logits(cfg, x, r0, v0)
        v = lambda n: _gpu_vec(x[n], r0, tr)  # noqa: E731
        return _logit_grads(d, t, cols, v("lbl"), v("lse_d"), v("lse_t"), v("ad"), v("at"), v("dce"), v("dl1"),
                            need_t, jac, cfg.soft)

    outs_x = [n for n in ("hd", "u", "ht") if need[n]]
    if outs_x:
        def dx_kernel(*refs):
            x = _split_refs(refs, names + [("o_" + n, True) for n in outs_x])
            r0 = pl.program_id(0) * tr
            for n in outs_x:
                _gpu_zero(x["o_" + n], r0, tr, r0 + tr, width[n], hc)

            def body(jv, c):
                v0 = jv * tv
                g_d, g_dh, g_t = tile(x, r0, v0)
                for n in outs_x:
                    g = {"hd": g_dh, "u": g_d, "ht": g_t}[n]
                    wref = x[src[n]]

                    def hbody(k, c2, n=n, g=g, wref=wref):
                        c0 = k * hc
                        wk = _gpu_load(wref, v0, tv, c0, hc, vocab, width[n])
                        _gpu_add(x["o_" + n], r0, tr, c0, hc, r0 + tr, width[n], _dot(g.astype(wk.dtype), wk, cfg.hp))
                        return c2

                    lax.fori_loop(0, pl.cdiv(width[n], hc), hbody, 0)
                return c

            lax.fori_loop(0, pl.cdiv(vocab, tv), body, 0)

        res = _gpu_call(cfg, dx_kernel, (rows // tr,),
                        [jax.ShapeDtypeStruct((rows, width[n]), F32) for n in outs_x])(*ins)
        grads.update(zip(outs_x, res))

    outs_w = [n for n in ("w", "w2") if need[n]]
    if outs_w:
        def dw_kernel(*refs):
            x = _split_refs(refs, names + [("o_" + n, True) for n in outs_w])
            v0 = pl.program_id(0) * tv
            for n in outs_w:
                _gpu_zero(x["o_" + n], v0, tv, vocab, width[n], hc)

            def body(ir, c):
                r0 = ir * tr
                g_d, g_dh, g_t = tile(x, r0, v0)
                terms = {"w": [(g_dh, "hd"), (g_t, "ht")], "w2": [(g_d, "u")]}
                for n in outs_w:
                    def hbody(k, c2, n=n):
                        c0 = k * hc
                        acc = jnp.zeros((tv, hc), F32)
                        for g, a in terms[n]:
                            xa = _gpu_load(x[a], r0, tr, c0, hc, r0 + tr, width[n])
                            acc = acc + _dot(g.T.astype(xa.dtype), xa, cfg.hp)
                        _gpu_add(x["o_" + n], v0, tv, c0, hc, vocab, width[n], acc)
                        return c2

                    lax.fori_loop(0, pl.cdiv(width[n], hc), hbody, 0)
                return c

            lax.fori_loop(0, rows // tr, body, 0)

        res = _gpu_call(cfg, dw_kernel, (pl.cdiv(vocab, tv),),
                        [jax.ShapeDtypeStruct((vocab, width[n]), F32) for n in outs_w])(*ins)
        grads.update(zip(outs_w, res))
    return grads
