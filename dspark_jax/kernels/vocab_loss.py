"""Fused vocabulary reduction for the DSpark loss (spec §3.4): per slot, CE and L1 from hidden states.

For each row (one slot of one block) with draft hidden ``h_d [H]``, aligned target hidden ``h_t [H]``, Markov
vector ``u [r]`` (optional) and label id ``y``::

    d = lm_head @ h_d + W2 @ u        t = lm_head @ h_t                  (logits over the vocab, fp32)
    CE = logsumexp(d) - d[y]          L1 = sum_v |softmax(d)_v - softmax(t)_v|

With ``softcap=cap`` (Gemma4) both ``lm_head`` products go through ``cap * tanh(x / cap)`` first; the Markov
bias is added after the cap (spec §2), so only the ``lm_head`` terms' gradients carry the ``1 - tanh^2`` factor.

Three implementations, same contract ``(ce [...], l1 [...])``:

* :func:`vocab_loss_reference`: dense; materialises ``[..., V]`` logits (the test oracle).
* ``impl="xla"``: :func:`dspark_jax.train.loss.slot_ce_l1_chunked` -- a ``lax.scan`` over vocab chunks with
  running max/sum, rematerialised in the backward pass (autodiff).
* ``impl="pallas"``: Pallas kernels with a hand-written ``custom_vjp``, tiled over rows and vocab chunks.
  Forward: pass 1 computes both log-sum-exps with a running max/sum; pass 2 the L1, the target logit and the
  two sums ``a_d = sum_v p_d sign(p_d - p_t)``, ``a_t = sum_v p_t sign(p_d - p_t)`` that the backward needs.
  Backward: per tile the logit gradients are, with ``s = sign(p_d - p_t)``::

      g_d = dL1 * p_d * (s - a_d) + dCE * (p_d - onehot(y))      g_t = dL1 * p_t * (a_t - s)

  and one kernel reduces over the vocab for ``dh_d = g_d @ lm_head``, ``du = g_d @ W2`` (and ``dh_t``), another
  over the rows for ``dW2 = g_d^T u`` (and ``dlm_head = g_d^T h_d + g_t^T h_t``). Only the gradients of inputs
  that are actually differentiated are computed (``custom_vjp`` with symbolic zeros): in training ``lm_head`` is
  frozen and the target hidden state is ``stop_gradient``, so the ``[V, H]`` weight gradient is never formed.

  Three drivers share the tile math (:func:`vocab_loss_fused`): the TPU (Mosaic) one uses a 2-D grid with the
  reduction axis last and accumulates into output blocks that stay resident; the GPU (Triton) one uses a 1-D
  grid over the non-reduced axis and loops over the reduced one inside the kernel, with masked loads (no
  padding of the ``[V, H]`` weights); the plain-XLA one (``backend="xla"``, not behind ``impl``) runs the same
  passes as a ``fori_loop`` over vocab chunks, for memory plans and as a readable statement of the kernels.
  On CPU ``impl="pallas"`` runs the TPU or GPU kernels in interpret mode (see ``kernels/_dispatch.py``).

No ``[rows, V]`` array exists in any implementation but the reference; the fused path's extra memory is
``O(rows * H)`` (fp32 gradient accumulators), ``O(V * r)`` (the W2 gradient) and a ``[rows, tile]`` tile.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dspark_jax.kernels._dispatch import resolve

F32 = jnp.float32
LANES = 128          # TPU: per-row vectors are stored lane-replicated as [rows, 128]
# (rows, vocab) per grid step; the dX kernel then holds ~11 MB of VMEM at H=2560 bf16 (double-buffered
# inputs, the resident fp32 [128, H] accumulator, [128, 256] fp32 intermediates): under a 16 MiB scoped default
TPU_TILES = (128, 256)
GPU_TILES = (64, 64, 64)  # (rows, vocab, hidden chunk); powers of two for Triton
XLA_VOCAB_TILE = 2048    # vocab rows per step of the plain-XLA driver

__all__ = ["ce_l1_from_logits", "vocab_loss", "vocab_loss_fused", "vocab_loss_reference"]


# ---- references ---------------------------------------------------------------------------------------------
def ce_l1_from_logits(draft_logits, target_logits, target_ids):
    """From materialised logits ``[..., V]``: (CE ``[...]``, L1 ``[...]``), fp32 softmaxes."""
    logp_d = jax.nn.log_softmax(draft_logits.astype(F32), axis=-1)
    ce = -jnp.take_along_axis(logp_d, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    p_t = jax.nn.softmax(target_logits.astype(F32), axis=-1)
    l1 = jnp.sum(jnp.abs(jnp.exp(logp_d) - p_t), axis=-1)
    return ce, l1


def apply_softcap(x, cap: float | None):
    """``cap * tanh(x / cap)`` (identity for None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def vocab_loss_reference(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *,
                         softcap: float | None = None):
    """Dense reference: fp32 logits ``[..., V]`` from the hidden states, then :func:`ce_l1_from_logits`.

    Args: draft_hidden / target_hidden ``[..., H]``; markov_u ``[..., r]`` or None; lm_head ``[V, H]``;
    markov_w2 ``[V, r]`` or None; target_ids ``[...]`` int; softcap: final-logit cap on the ``lm_head``
    products (before the Markov bias) or None.
    """
    hp = lax.Precision.HIGHEST
    d = jnp.einsum("...h,vh->...v", draft_hidden.astype(F32), lm_head.astype(F32), precision=hp)
    d = apply_softcap(d, softcap)
    if markov_u is not None:
        d = d + jnp.einsum("...r,vr->...v", markov_u.astype(F32), markov_w2.astype(F32), precision=hp)
    t = apply_softcap(jnp.einsum("...h,vh->...v", target_hidden.astype(F32), lm_head.astype(F32), precision=hp),
                      softcap)
    return ce_l1_from_logits(d, t, target_ids)


# ---- dispatch -----------------------------------------------------------------------------------------------
def vocab_loss(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *, chunk: int = 8192,
               impl: str = "auto", row_tile: int | None = None, vocab_tile: int | None = None,
               softcap: float | None = None):
    """(CE, L1) per row without materialising ``[..., V]``; ``impl`` as in ``kernels/_dispatch.py``.

    ``chunk`` is the vocab chunk of the XLA scan; ``row_tile`` / ``vocab_tile`` the Pallas tiles (None: per
    backend defaults, clipped to the problem). Same contract as :func:`vocab_loss_reference` (``softcap``
    included).
    """
    if (markov_u is None) != (markov_w2 is None):
        raise ValueError("markov_u and markov_w2 come together (both None without a Markov head)")
    kind, target = resolve(impl, "vocab_loss")
    if kind == "xla":
        from dspark_jax.train.loss import slot_ce_l1_chunked  # the loss module imports this one

        return slot_ce_l1_chunked(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, chunk,
                                  softcap=softcap)
    return vocab_loss_fused(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids,
                             backend=target, row_tile=row_tile, vocab_tile=vocab_tile, softcap=softcap)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    kind: str        # "tpu" | "gpu"
    interpret: bool
    tr: int          # rows per tile
    tv: int          # vocab rows per tile
    vocab: int
    hc: int          # GPU: hidden / rank columns per inner step
    hp: bool         # fp32 operands: full-precision dots
    softcap: float | None = None   # cap on the lm_head logits (before the Markov bias)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vocab_loss_fused(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *,
                      backend: str = "tpu-interpret", row_tile: int | None = None, vocab_tile: int | None = None,
                      softcap: float | None = None):
    """The fused algorithm (custom_vjp, two vocab passes, hand-written backward) on one driver.

    ``backend``: ``"tpu"`` (Mosaic) / ``"gpu"`` (Triton) Pallas kernels, compiled; ``"tpu-interpret"`` /
    ``"gpu-interpret"``: the same kernels in Pallas interpret mode (any backend, for tests); ``"xla"``: the same
    tile math as plain XLA ops in a ``fori_loop`` over vocab chunks (all rows at once), which XLA's memory plan
    can see on any backend. Tiles default per driver (``TPU_TILES``, ``GPU_TILES``, ``XLA_VOCAB_TILE``).
    ``softcap``: as in :func:`vocab_loss_reference`.
    """
    kind, _, mode = backend.partition("-")
    if kind not in ("tpu", "gpu", "xla") or mode not in ("", "interpret") or (kind == "xla" and mode):
        raise ValueError(f"vocab_loss_fused backend={backend!r}: expected tpu|gpu[-interpret] or xla")
    lead = target_ids.shape
    rows = math.prod(lead)
    vocab, hidden = lm_head.shape
    has_u = markov_u is not None
    dt = jnp.result_type(draft_hidden, target_hidden, lm_head, *((markov_u, markov_w2) if has_u else ()))
    if kind == "xla":          # all rows at once, a loop over vocab chunks (the last one overlaps, no padding)
        tr, tv, hc = rows, min(vocab_tile or XLA_VOCAB_TILE, vocab), hidden
    elif kind == "tpu":
        tr, tv = row_tile or TPU_TILES[0], vocab_tile or TPU_TILES[1]
        tr = min(tr, _round_up(rows, 8))
        tv = vocab if vocab <= tv else tv
        hc = hidden
    else:
        tr, tv, hc = row_tile or GPU_TILES[0], vocab_tile or GPU_TILES[1], GPU_TILES[2]
        tr = min(tr, max(16, _next_pow2(rows)))
        tv = min(tv, max(16, _next_pow2(vocab)))
        hc = min(hc, max(16, _next_pow2(max(hidden, markov_u.shape[-1] if has_u else 1))))
    cfg = _Cfg(kind, mode == "interpret", int(tr), int(tv), int(vocab), int(hc), jnp.dtype(dt) == jnp.float32,
               None if softcap is None else float(softcap))
    padded = _round_up(rows, tr)

    def flat(x):
        x = x.reshape(rows, x.shape[-1]).astype(dt)
        return jnp.pad(x, ((0, padded - rows), (0, 0))) if padded > rows else x

    ids = target_ids.reshape(rows).astype(jnp.int32)
    ids = jnp.pad(ids, (0, padded - rows)) if padded > rows else ids
    u = flat(markov_u) if has_u else None
    w2 = markov_w2.astype(dt) if has_u else None
    ce, l1 = _fused(flat(draft_hidden), flat(target_hidden), u, lm_head.astype(dt), w2, ids, cfg)
    return ce[:rows].reshape(lead), l1[:rows].reshape(lead)


# ---- tile math shared by both drivers (row vectors are [tr, 1]) -------------------------------------------------
def _sign(x):
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0)).astype(F32)


def _online(m, s, x):
    """Running max/sum update of ``logsumexp`` with one ``[tr, tv]`` chunk (``-inf`` = masked column)."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=True))
    s_new = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new), axis=1, keepdims=True)
    return m_new, s_new


def _l1_terms(d, t, lse_d, lse_t):
    p_d, p_t = jnp.exp(d - lse_d), jnp.exp(t - lse_t)
    diff = p_d - p_t
    sg = _sign(diff)
    s = functools.partial(jnp.sum, axis=1, keepdims=True)
    return s(jnp.abs(diff)), s(p_d * sg), s(p_t * sg)


def _capped(z, cap):
    """``(cap * tanh(z / cap), 1 - tanh^2)`` of raw ``lm_head`` logits; ``(z, None)`` without a cap. The
    derivative is kept for the backward (unused values are dropped from the forward kernels)."""
    if cap is None:
        return z, None
    th = jnp.tanh(z / cap)
    return cap * th, 1.0 - th * th


def _logit_grads(d, t, cols, ids, lse_d, lse_t, a_d, a_t, dce, dl1, need_t, jac=(None, None)):
    """Returns ``(g_d, g_dh, g_t)``: the gradient of the draft logits (what the Markov term receives), of the
    draft's raw ``lm_head`` logits (``g_d`` through the softcap's derivative ``jac[0]``) and of the target's raw
    logits."""
    p_d, p_t = jnp.exp(d - lse_d), jnp.exp(t - lse_t)
    sg = _sign(p_d - p_t)
    onehot = (cols == ids).astype(F32)
    g_d = dl1 * p_d * (sg - a_d) + dce * (p_d - onehot)
    g_t = dl1 * p_t * (a_t - sg) if need_t else None
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


# ---- TPU (Mosaic) driver: grid (row tile, vocab tile) / (vocab tile, row tile) ---------------------------------
def _tpu_params(semantics):
    from jax.experimental.pallas import tpu as pltpu

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


def _split_refs(refs, names):
    it = iter(refs)
    return {n: (next(it) if present else None) for n, present in names}


def _tpu_call(cfg, kernel, grid, in_specs, out_specs, out_shape, semantics):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret,
                          compiler_params=None if cfg.interpret else _tpu_params(semantics))


def _tpu_forward(cfg, hd, ht, u, w, w2, ids):
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

    def lse_kernel(*refs):
        x = _split_refs(refs, names + [("md", True), ("sd", True), ("mt", True), ("st", True)])
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            for n, v in (("md", -jnp.inf), ("sd", 0.0), ("mt", -jnp.inf), ("st", 0.0)):
                x[n][...] = jnp.full((cfg.tr, LANES), v, F32)

        d, t, _, _, _, _ = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"), x["w"][...],
                                            _get(x, "w2"))
        for m, s, z in (("md", "sd", d), ("mt", "st", t)):
            mn, sn = _online(x[m][:, :1], x[s][:, :1], z)
            x[m][...] = jnp.broadcast_to(mn, (cfg.tr, LANES))
            x[s][...] = jnp.broadcast_to(sn, (cfg.tr, LANES))

    md, sd, mt, st = _tpu_call(cfg, lse_kernel, grid, in_specs, [vec] * 4, [vec_shape] * 4,
                               ("parallel", "arbitrary"))(*ins)
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)
    ids_v = jnp.broadcast_to(ids[:, None], (rows, LANES))

    def l1_kernel(*refs):
        x = _split_refs(refs, names + [("ids", True), ("lse_d", True), ("lse_t", True),
                                       ("l1", True), ("ad", True), ("at", True), ("tg", True)])
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            for n in ("l1", "ad", "at", "tg"):
                x[n][...] = jnp.zeros((cfg.tr, LANES), F32)

        d, t, cols, _, _, _ = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"),
                                               x["w"][...], _get(x, "w2"))
        l1, ad, at = _l1_terms(d, t, x["lse_d"][:, :1], x["lse_t"][:, :1])
        tg = jnp.sum(jnp.where(cols == x["ids"][:, :1], d, 0.0), axis=1, keepdims=True)
        for n, v in (("l1", l1), ("ad", ad), ("at", at), ("tg", tg)):
            x[n][...] += jnp.broadcast_to(v, (cfg.tr, LANES))

    ids_spec = pl.BlockSpec((cfg.tr, LANES), lambda i, j: (i, 0))
    l1, ad, at, tg = _tpu_call(cfg, l1_kernel, grid, in_specs + [ids_spec, vec, vec], [vec] * 4, [vec_shape] * 4,
                               ("parallel", "arbitrary"))(*ins, ids_v, lse_d, lse_t)
    first = lambda a: a[:, 0]  # noqa: E731
    return first(lse_d - tg), first(l1), tuple(map(first, (lse_d, lse_t, ad, at)))


def _tpu_backward(cfg, need, hd, ht, u, w, w2, ids, stats, dce, dl1):
    """need: dict of bools for hd, ht, u, w, w2 -> their (fp32) gradients or None."""
    rows, hidden = hd.shape
    has_u = u is not None
    r = u.shape[1] if has_u else 0
    vec_in = [jnp.broadcast_to(v[:, None], (rows, LANES)) for v in (ids, *stats, dce, dl1)]  # lane-replicated
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else []) + vec_in
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)] + [
        (n, True) for n in ("ids", "lse_d", "lse_t", "ad", "at", "dce", "dl1")]
    need_t = need["ht"] or need["w"]
    grads = dict.fromkeys(("hd", "ht", "u", "w", "w2"))

    def tile(x, j):
        d, t, cols, wm, w2m, jac = _tpu_tile_logits(cfg, j, x["hd"][...], x["ht"][...], _get(x, "u"),
                                                    x["w"][...], _get(x, "w2"))
        v = lambda n: x[n][:, :1]  # noqa: E731
        g_d, g_dh, g_t = _logit_grads(d, t, cols, v("ids"), v("lse_d"), v("lse_t"), v("ad"), v("at"), v("dce"),
                                      v("dl1"), need_t, jac)
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


# ---- GPU (Triton) driver: 1-D grid, the reduced axis looped inside the kernel, masked loads --------------------
def _gpu_call(cfg, kernel, grid, out_shape):
    params = None
    if not cfg.interpret:
        from jax.experimental.pallas import triton as pltr

        params = pltr.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=cfg.interpret, compiler_params=params)


def _gpu_load(ref, r0, nr, c0, nc, rmax, cmax, dtype=None):
    """Masked ``ref[r0:r0+nr, c0:c0+nc]`` (zeros outside ``[:rmax, :cmax]``)."""
    from jax.experimental.pallas import triton as pltr

    rmask = (r0 + jnp.arange(nr)) < rmax
    cmask = (c0 + jnp.arange(nc)) < cmax
    return pltr.load(ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], mask=rmask[:, None] & cmask[None, :], other=0)


def _gpu_add(ref, r0, nr, c0, nc, rmax, cmax, val):
    """Masked ``ref[r0:r0+nr, c0:c0+nc] += val``."""
    from jax.experimental.pallas import triton as pltr

    mask = ((r0 + jnp.arange(nr)) < rmax)[:, None] & ((c0 + jnp.arange(nc)) < cmax)[None, :]
    idx = (pl.ds(r0, nr), pl.ds(c0, nc))
    cur = pltr.load(ref.at[idx], mask=mask, other=0.0)
    pltr.store(ref.at[idx], cur + val, mask=mask)


def _gpu_zero(ref, r0, nr, rmax, width, hc):
    """Masked ``ref[r0:r0+nr, :width] = 0``."""
    from jax.experimental.pallas import triton as pltr

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
    rows = hd.shape[0]
    has_u = u is not None
    tr, tv = cfg.tr, cfg.tv
    nv = pl.cdiv(cfg.vocab, tv)
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else [])
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)]
    vec_shape = jax.ShapeDtypeStruct((rows,), F32)

    def lse_kernel(*refs):
        x = _split_refs(refs, names + [("lse_d", True), ("lse_t", True)])
        r0 = pl.program_id(0) * tr

        def body(jv, carry):
            md, sd, mt, st = carry
            d, t, _, _ = _gpu_tile_logits(cfg, x, r0, jv * tv)
            md, sd = _online(md, sd, d)
            mt, st = _online(mt, st, t)
            return md, sd, mt, st

        ninf, zero = jnp.full((tr, 1), -jnp.inf, F32), jnp.zeros((tr, 1), F32)
        md, sd, mt, st = lax.fori_loop(0, nv, body, (ninf, zero, ninf, zero))
        x["lse_d"][pl.ds(r0, tr)] = (md + jnp.log(sd))[:, 0]
        x["lse_t"][pl.ds(r0, tr)] = (mt + jnp.log(st))[:, 0]

    lse_d, lse_t = _gpu_call(cfg, lse_kernel, (rows // tr,), [vec_shape] * 2)(*ins)

    def l1_kernel(*refs):
        x = _split_refs(refs, names + [(n, True) for n in ("ids", "lse_d", "lse_t", "l1", "ad", "at", "tg")])
        r0 = pl.program_id(0) * tr
        ids_t, ld, lt = (_gpu_vec(x[n], r0, tr) for n in ("ids", "lse_d", "lse_t"))

        def body(jv, carry):
            d, t, cols, _ = _gpu_tile_logits(cfg, x, r0, jv * tv)
            l1, ad, at = _l1_terms(d, t, ld, lt)
            tg = jnp.sum(jnp.where(cols == ids_t, d, 0.0), axis=1, keepdims=True)
            return tuple(c + v for c, v in zip(carry, (l1, ad, at, tg)))

        zero = jnp.zeros((tr, 1), F32)
        res = lax.fori_loop(0, nv, body, (zero,) * 4)
        for n, v in zip(("l1", "ad", "at", "tg"), res):
            x[n][pl.ds(r0, tr)] = v[:, 0]

    l1, ad, at, tg = _gpu_call(cfg, l1_kernel, (rows // tr,), [vec_shape] * 4)(*ins, ids, lse_d, lse_t)
    return lse_d - tg, l1, (lse_d, lse_t, ad, at)


def _gpu_backward(cfg, need, hd, ht, u, w, w2, ids, stats, dce, dl1):
    rows, hidden = hd.shape
    has_u = u is not None
    r = u.shape[1] if has_u else 0
    tr, tv, hc, vocab = cfg.tr, cfg.tv, cfg.hc, cfg.vocab
    ins = [hd, ht] + ([u] if has_u else []) + [w] + ([w2] if has_u else []) + [ids, *stats, dce, dl1]
    names = [("hd", True), ("ht", True), ("u", has_u), ("w", True), ("w2", has_u)] + [
        (n, True) for n in ("ids", "lse_d", "lse_t", "ad", "at", "dce", "dl1")]
    need_t = need["ht"] or need["w"]
    grads = dict.fromkeys(("hd", "ht", "u", "w", "w2"))
    width = {"hd": hidden, "u": r, "ht": hidden, "w": hidden, "w2": r}
    src = {"hd": "w", "ht": "w", "u": "w2"}

    def tile(x, r0, v0):
        d, t, cols, jac = _gpu_tile_logits(cfg, x, r0, v0)
        v = lambda n: _gpu_vec(x[n], r0, tr)  # noqa: E731
        return _logit_grads(d, t, cols, v("ids").astype(jnp.int32), v("lse_d"), v("lse_t"), v("ad"), v("at"),
                            v("dce"), v("dl1"), need_t, jac)

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


# ---- plain-XLA driver: the same two passes and hand-written backward, a fori_loop over vocab chunks ----------
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
    rows = hd.shape[0]
    wb, w2b = _as_bits(w), (None if u is None else _as_bits(w2))
    nv = pl.cdiv(cfg.vocab, cfg.tv)
    ids_c = ids[:, None]

    def lse_body(j, carry):
        md, sd, mt, st = carry
        d, t, _, _, _, _, _ = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        return (*_online(md, sd, d), *_online(mt, st, t))

    ninf, zero = jnp.full((rows, 1), -jnp.inf, F32), jnp.zeros((rows, 1), F32)
    md, sd, mt, st = lax.fori_loop(0, nv, lse_body, (ninf, zero, ninf, zero))
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)

    def l1_body(j, carry):
        d, t, cols, _, _, _, _ = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        tg = jnp.sum(jnp.where(cols == ids_c, d, 0.0), axis=1, keepdims=True)
        return tuple(c + v for c, v in zip(carry, (*_l1_terms(d, t, lse_d, lse_t), tg)))

    l1, ad, at, tg = lax.fori_loop(0, nv, l1_body, (zero,) * 4)
    first = lambda a: a[:, 0]  # noqa: E731
    return first(lse_d - tg), first(l1), tuple(map(first, (lse_d, lse_t, ad, at)))


def _xla_backward(cfg, need, hd, ht, u, w, w2, ids, stats, dce, dl1):
    wb, w2b = _as_bits(w), (None if u is None else _as_bits(w2))
    col = lambda v: v[:, None]  # noqa: E731
    lse_d, lse_t, ad, at = map(col, stats)
    need_t = need["ht"] or need["w"]
    init = {n: jnp.zeros(x.shape, F32) for n, x in (("hd", hd), ("u", u), ("ht", ht), ("w", w), ("w2", w2))
            if need[n]}

    def body(j, acc):
        d, t, cols, wc, w2c, start, jac = _xla_chunk(cfg, j, hd, ht, u, wb, w2b, w.dtype)
        g_d, g_dh, g_t = _logit_grads(d, t, cols, col(ids), lse_d, lse_t, ad, at, col(dce), col(dl1), need_t, jac)
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


# ---- custom_vjp ---------------------------------------------------------------------------------------------
def _forward(cfg, hd, ht, u, w, w2, ids):
    fwd = {"tpu": _tpu_forward, "gpu": _gpu_forward, "xla": _xla_forward}[cfg.kind]
    return fwd(cfg, hd, ht, u, w, w2, ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(hd, ht, u, w, w2, ids, cfg):
    ce, l1, _ = _forward(cfg, hd, ht, u, w, w2, ids)
    return ce, l1


def _fused_fwd(hd, ht, u, w, w2, ids, cfg):
    # symbolic_zeros=True: each differentiable leaf arrives as CustomVJPPrimal(value, perturbed)
    val = lambda p: None if p is None else p.value  # noqa: E731
    pert = lambda p: p is not None and bool(p.perturbed)  # noqa: E731
    args = [val(a) for a in (hd, ht, u, w, w2, ids)]
    ce, l1, stats = _forward(cfg, *args)
    # which gradients are needed is encoded in the residual's structure: () = needed, None = not
    flags = tuple(() if pert(p) else None for p in (hd, ht, u, w, w2))
    return (ce, l1), (tuple(args), stats, flags)


def _zeros_if_symbolic(ct, like):
    from jax.custom_derivatives import SymbolicZero

    return jnp.zeros(like.shape, F32) if isinstance(ct, SymbolicZero) or ct is None else ct.astype(F32)


def _fused_bwd(cfg, res, cts):
    args, stats, flags = res
    hd, ht, u, w, w2, ids = args
    dce, dl1 = (_zeros_if_symbolic(c, stats[0]) for c in cts)
    need = dict(zip(("hd", "ht", "u", "w", "w2"), (f is not None for f in flags)))
    bwd = {"tpu": _tpu_backward, "gpu": _gpu_backward, "xla": _xla_backward}[cfg.kind]
    grads = bwd(cfg, need, hd, ht, u, w, w2, ids, stats, dce, dl1)
    out = []
    for name, x in zip(("hd", "ht", "u", "w", "w2"), (hd, ht, u, w, w2)):
        g = grads[name]
        out.append(None if g is None else g.astype(x.dtype))
    return (*out, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
