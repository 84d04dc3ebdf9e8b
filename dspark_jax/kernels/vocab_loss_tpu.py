"""TPU (Mosaic) driver of the fused vocab loss: Pallas kernels for the two forward passes and the backward.

Grids are ``(row tile, vocab tile)`` for the forward and the dX kernel and ``(vocab tile, row tile)`` for the dW
kernel, the reduction axis last: the outputs accumulate into blocks that stay resident across it. Per-row vectors
are stored lane-replicated as ``[rows, LANES]``. Compiled on TPU; ``cfg.interpret`` runs the same kernels in
Pallas interpret mode on any backend. Called per row shard by :mod:`dspark_jax.kernels.vocab_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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

LANES = 128          # per-row vectors are stored lane-replicated as [rows, 128]


def _tpu_params(semantics):
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=semantics)


def _tpu_tile_logits(cfg, j, hd, ht, u, w, w2):
    """Masked fp32 logits of one tile; returns (d, t, cols [1, tv], w_masked, w2_masked, softcap derivatives
    (jd, jt))."""
    vrow = j * cfg.tv + lax.broadcasted_iota(jnp.int32, (cfg.tv, 1), 0)
    w = jnp.where(vrow < cfg.vocab, w, jnp.zeros_like(w))          # partial last block: garbage rows -> 0
    cols = j * cfg.tv + lax.broadcasted_iota(jnp.int32, (1, cfg.tv), 1)
    neg = jnp.where(cols < cfg.vocab, 0.0, -jnp.inf).astype(F32)
    d, jd = _capped(_dot_nt(hd, w, cfg.hp), cfg.softcap)
    if u is not None:
        w2 = jnp.where(vrow < cfg.vocab, w2, jnp.zeros_like(w2))
        d = d + _dot_nt(u, w2, cfg.hp)
    t, jt = _capped(_dot_nt(ht, w, cfg.hp), cfg.softcap) if ht is not None else (None, None)
    return d + neg, (t + neg if t is not None else None), cols, w, w2, (jd, jt)


def _get(x, name):
    return None if x[name] is None else x[name][...]


def _tpu_call(cfg, kernel, grid, in_specs, out_specs, out_shape, semantics):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret,
                          compiler_params=None if cfg.interpret else _tpu_params(semantics))


def _tpu_forward(cfg, hd, ht, u, w, w2, ids):
    """-> ``(ce, l1, lse_d, lse_t, a_d, a_t, tg)`` and, with soft targets, the two argmaxes (fp32), all ``[rows]``."""
    rows, hidden = hd.shape
    has_u = u is not None
    grid = (rows // cfg.tr, pl.cdiv(cfg.vocab, cfg.tv))
    row_spec = lambda width: pl.BlockSpec((cfg.tr, width), lambda i, j: (i, 0))  # noqa: E731
    voc_spec = lambda width: pl.BlockSpec((cfg.tv, width), lambda i, j: (j, 0))  # noqa: E731
    vec = row_spec(LANES)
    vec_shape = jax.ShapeDtypeStruct((rows, LANES), F32)
    r = u.shape[1] if has_u else 0
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else [])
    in_specs = [row_spec(hidden), row_spec(hidden)] + ([row_spec(r)] if has_u else []) + [voc_spec(hidden)] + (
        [voc_spec(r)] if has_u else [])
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)]
    lse_outs = ["md", "sd", "mt", "st"] + (["xd", "xt"] if cfg.soft else [])

    def lse_kernel(*refs):
        x = _split_refs(refs, names + [(n, True) for n in lse_outs])
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            for n in lse_outs:
                x[n][...] = jnp.full((cfg.tr, LANES), -jnp.inf if n in ("md", "mt") else 0.0, F32)

        d, t, cols, _, _, _ = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"), x["w"][...],
                                               _get(x, "w2"))
        for m, s, a, z in (("md", "sd", "xd", d), ("mt", "st", "xt", t)):
            m_old = x[m][:, :1]
            if cfg.soft:
                x[a][...] = jnp.broadcast_to(_argmax_update(m_old, x[a][:, :1], z, cols), (cfg.tr, LANES))
            mn, sn = _online(m_old, x[s][:, :1], z)
            x[m][...] = jnp.broadcast_to(mn, (cfg.tr, LANES))
            x[s][...] = jnp.broadcast_to(sn, (cfg.tr, LANES))

    md, sd, mt, st, *am = _tpu_call(cfg, lse_kernel, grid, in_specs, [vec] * len(lse_outs),
                                    [vec_shape] * len(lse_outs), ("parallel", "arbitrary"))(*ins)
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)
    lbl_in, lbl_spec = [], []
    if not cfg.soft:
        lbl_in, lbl_spec = [jnp.broadcast_to(ids[:, None], (rows, LANES))], [vec]

    def l1_kernel(*refs):
        x = _split_refs(refs, names + [("ids", not cfg.soft), ("lse_d", True), ("lse_t", True),
                                       ("l1", True), ("ad", True), ("at", True), ("tg", True)])
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            for n in ("l1", "ad", "at", "tg"):
                x[n][...] = jnp.zeros((cfg.tr, LANES), F32)

        d, t, cols, _, _, _ = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"),
                                               x["w"][...], _get(x, "w2"))
        lbl = None if cfg.soft else x["ids"][:, :1]
        terms = _pass2_terms(cfg.soft, d, t, cols, lbl, x["lse_d"][:, :1], x["lse_t"][:, :1])
        for n, v in zip(("l1", "ad", "at", "tg"), terms):
            x[n][...] += jnp.broadcast_to(v, (cfg.tr, LANES))

    l1, ad, at, tg = _tpu_call(cfg, l1_kernel, grid, in_specs + lbl_spec + [vec, vec], [vec] * 4, [vec_shape] * 4,
                               ("parallel", "arbitrary"))(*ins, *lbl_in, lse_d, lse_t)
    first = lambda a: a[:, 0]  # noqa: E731
    return tuple(map(first, (lse_d - tg, l1, lse_d, lse_t, ad, at, tg, *am)))


def _tpu_backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1):
    """need: dict of bools for hd, ht, u, w, w2 -> their (fp32) gradients or None. ``lbl``: ids, or with soft
    targets the forward's ``tg``."""
    rows, hidden = hd.shape
    has_u = u is not None
    r = u.shape[1] if has_u else 0
    vec_in = [jnp.broadcast_to(v[:, None], (rows, LANES)) for v in (lbl, *stats, dce, dl1)]  # lane-replicated
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else []) + vec_in
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)] + [
        (n, True) for n in ("lbl", "lse_d", "lse_t", "ad", "at", "dce", "dl1")]
    need_t = need["ht"] or need["w"]
    grads = dict.fromkeys(("hd", "ht", "u", "w", "w2"))

    def tile(x, j):
        d, t, cols, wm, w2m, jac = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"),
                                                    x["w"][...], _get(x, "w2"))
        v = lambda n: x[n][:, :1]  # noqa: E731
        g_d, g_dh, g_t = _logit_grads(d, t, cols, v("lbl"), v("lse_d"), v("lse_t"), v("ad"), v("at"), v("dce"),
                                      v("dl1"), need_t, jac, cfg.soft)
        return g_d, g_dh, g_t, wm, w2m

    # dX: grid (row tile, vocab tile), reduce over vocab
    outs_x = [n for n in ("hd", "u", "ht") if need[n]]
    if outs_x:
        width = {"hd": hidden, "u": r, "ht": hidden}

        def dx_kernel(*refs):
            x = _split_refs(refs, names + [("o_" + n, True) for n in outs_x])
            j = pl.program_id(1)

            @pl.when(j == 0)
            def _init():
                for n in outs_x:
                    x["o_" + n][...] = jnp.zeros((cfg.tr, width[n]), F32)

            g_d, g_dh, g_t, wm, w2m = tile(x, j)
            if "hd" in outs_x:
                x["o_hd"][...] += _dot(g_dh.astype(wm.dtype), wm, cfg.hp)
            if "u" in outs_x:
                x["o_u"][...] += _dot(g_d.astype(w2m.dtype), w2m, cfg.hp)
            if "ht" in outs_x:
                x["o_ht"][...] += _dot(g_t.astype(wm.dtype), wm, cfg.hp)

        grid = (rows // cfg.tr, pl.cdiv(cfg.vocab, cfg.tv))
        rs = lambda wd: pl.BlockSpec((cfg.tr, wd), lambda i, j: (i, 0))  # noqa: E731
        vs = lambda wd: pl.BlockSpec((cfg.tv, wd), lambda i, j: (j, 0))  # noqa: E731
        in_specs = [rs(hidden), rs(hidden)] + ([rs(r)] if has_u else []) + [vs(hidden)] + (
            [vs(r)] if has_u else []) + [rs(LANES)] * 7
        res = _tpu_call(cfg, dx_kernel, grid, in_specs, [rs(width[n]) for n in outs_x],
                        [jax.ShapeDtypeStruct((rows, width[n]), F32) for n in outs_x],
                        ("parallel", "arbitrary"))(*ins)
        grads.update(zip(outs_x, res))

    # dW: grid (vocab tile, row tile), reduce over rows
    outs_w = [n for n in ("w", "w2") if need[n]]
    if outs_w:
        width = {"w": hidden, "w2": r}

        def dw_kernel(*refs):
            x = _split_refs(refs, names + [("o_" + n, True) for n in outs_w])
            j, i = pl.program_id(0), pl.program_id(1)

            @pl.when(i == 0)
            def _init():
                for n in outs_w:
                    x["o_" + n][...] = jnp.zeros((cfg.tv, width[n]), F32)

            g_d, g_dh, g_t, _, _ = tile(x, j)
            if "w" in outs_w:
                hd_t, ht_t = x["hd"][...], x["ht"][...]
                x["o_w"][...] += _dot(g_dh.T.astype(hd_t.dtype), hd_t, cfg.hp) + _dot(
                    g_t.T.astype(ht_t.dtype), ht_t, cfg.hp)
            if "w2" in outs_w:
                u_t = x["u"][...]
                x["o_w2"][...] += _dot(g_d.T.astype(u_t.dtype), u_t, cfg.hp)

        grid = (pl.cdiv(cfg.vocab, cfg.tv), rows // cfg.tr)
        rs = lambda wd: pl.BlockSpec((cfg.tr, wd), lambda j, i: (i, 0))  # noqa: E731
        vs = lambda wd: pl.BlockSpec((cfg.tv, wd), lambda j, i: (j, 0))  # noqa: E731
        in_specs = [rs(hidden), rs(hidden)] + ([rs(r)] if has_u else []) + [vs(hidden)] + (
            [vs(r)] if has_u else []) + [rs(LANES)] * 7
        res = _tpu_call(cfg, dw_kernel, grid, in_specs, [vs(width[n]) for n in outs_w],
                        [jax.ShapeDtypeStruct((cfg.vocab, width[n]), F32) for n in outs_w],
                        ("parallel", "arbitrary"))(*ins)
        grads.update(zip(outs_w, res))
    return grads
