"""Fused vocabulary reduction for the DSpark loss (spec §3.4): per slot, CE and L1 from hidden states.

For each row (one slot of one block) with draft hidden ``h_d [H]``, aligned target hidden ``h_t [H]``, Markov
vector ``u [r]`` (optional) and label id ``y``::

    d = lm_head @ h_d + W2 @ u        t = lm_head @ h_t                  (logits over the vocab, fp32)
    CE = logsumexp(d) - d[y]          L1 = sum_v |softmax(d)_v - softmax(t)_v|

With ``softcap=cap`` (Gemma4) both ``lm_head`` products go through ``cap * tanh(x / cap)`` first; the Markov
bias is added after the cap (spec §2), so only the ``lm_head`` terms' gradients carry the ``1 - tanh^2`` factor.

Three implementations, same contract ``(ce [...], l1 [...])``:

* :func:`vocab_loss_reference`: dense; materialises ``[..., V]`` logits (the test oracle).
* ``impl="xla"``: :func:`dspark_jax.kernels.vocab_loss_chunked.slot_ce_l1_chunked` -- a ``lax.scan`` over vocab
  chunks with running max/sum, rematerialised in the backward pass (autodiff).
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

Soft targets (Eagle3, :func:`soft_vocab_loss`): the same kernels with the label replaced by the target's whole
distribution, ``CE = lse_d - sum_v p_t d`` (``onehot(y)`` becomes ``p_t`` in ``g_d``; ``g_t`` gains
``-dCE * p_t * (d - sum_v p_t d)``), plus the first-occurrence argmax of both logits, tracked in pass 1.

Under a multi-device jit each Pallas forward / backward is wrapped in ``custom_partitioning``
(:func:`_row_sharded`): the kernels run on each device's shard of the rows, the ``[V, .]`` weights are gathered
for the call, and the weight gradients (sums over rows) are ``psum``-ed over the row shards.
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
from dspark_jax.kernels.vocab_loss_chunked import apply_softcap, slot_ce_l1_chunked, soft_ce_chunked  # noqa: F401

F32 = jnp.float32
LANES = 128          # TPU: per-row vectors are stored lane-replicated as [rows, 128]
# (rows, vocab) per grid step; the dX kernel then holds ~11 MB of VMEM at H=2560 bf16 (double-buffered
# inputs, the resident fp32 [128, H] accumulator, [128, 256] fp32 intermediates): under a 16 MiB scoped default
TPU_TILES = (128, 256)
GPU_TILES = (64, 64, 64)  # (rows, vocab, hidden chunk); powers of two for Triton
XLA_VOCAB_TILE = 2048    # vocab rows per step of the plain-XLA driver

__all__ = ["ce_l1_from_logits", "soft_ce_from_logits", "soft_vocab_loss", "soft_vocab_loss_fused",
           "soft_vocab_loss_reference", "vocab_loss", "vocab_loss_fused", "vocab_loss_reference"]


# ---- references ---------------------------------------------------------------------------------------------
def ce_l1_from_logits(draft_logits, target_logits, target_ids):
    """From materialised logits ``[..., V]``: (CE ``[...]``, L1 ``[...]``), fp32 softmaxes."""
    logp_d = jax.nn.log_softmax(draft_logits.astype(F32), axis=-1)
    ce = -jnp.take_along_axis(logp_d, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    p_t = jax.nn.softmax(target_logits.astype(F32), axis=-1)
    l1 = jnp.sum(jnp.abs(jnp.exp(logp_d) - p_t), axis=-1)
    return ce, l1


def soft_ce_from_logits(draft_logits, target_logits):
    """``[..., V]`` each -> (soft CE ``-sum_v p_t log p_d``, L1 ``sum_v |p_d - p_t|``, argmax match), each
    ``[...]``; fp32 softmaxes."""
    logp_d = jax.nn.log_softmax(draft_logits.astype(F32), axis=-1)
    p_t = jax.nn.softmax(target_logits.astype(F32), axis=-1)
    ce = -jnp.sum(p_t * logp_d, axis=-1)
    l1 = jnp.sum(jnp.abs(jnp.exp(logp_d) - p_t), axis=-1)
    correct = jnp.argmax(draft_logits, axis=-1) == jnp.argmax(target_logits, axis=-1)
    return ce, l1, correct


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


def soft_vocab_loss_reference(draft_hidden, target_hidden, lm_head, *, softcap: float | None = None):
    """Dense reference of :func:`soft_vocab_loss`: fp32 ``[..., V]`` logits, then :func:`soft_ce_from_logits`."""
    hp = lax.Precision.HIGHEST
    logits = lambda h: apply_softcap(  # noqa: E731
        jnp.einsum("...h,vh->...v", h.astype(F32), lm_head.astype(F32), precision=hp), softcap)
    return soft_ce_from_logits(logits(draft_hidden), logits(target_hidden))


# ---- dispatch -----------------------------------------------------------------------------------------------
def vocab_loss(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *, chunk: int = 8192,
               impl: str = "auto", row_tile: int | None = None, vocab_tile: int | None = None,
               softcap: float | None = None):
    """(CE, L1) per row without materialising ``[..., V]``; ``impl`` as in ``kernels/_dispatch.py``.

    ``chunk`` is the vocab chunk of the XLA scan (a chunk covering the vocab runs the one-pass
    :func:`~dspark_jax.kernels.vocab_loss_dense.vocab_loss_dense` instead); ``row_tile`` / ``vocab_tile`` the Pallas tiles (None: per
    backend defaults, clipped to the problem). Same contract as :func:`vocab_loss_reference` (``softcap``
    included).
    """
    if (markov_u is None) != (markov_w2 is None):
        raise ValueError("markov_u and markov_w2 come together (both None without a Markov head)")
    kind, target = resolve(impl, "vocab_loss")
    if kind == "xla" and chunk >= lm_head.shape[0]:
        # one chunk is the whole vocab: the scan would only recompute the logits (three times each)
        from dspark_jax.kernels.vocab_loss_dense import vocab_loss_dense

        return vocab_loss_dense(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids,
                                softcap=softcap)
    if kind == "xla":
        return slot_ce_l1_chunked(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, chunk,
                                  softcap=softcap)
    return vocab_loss_fused(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids,
                             backend=target, row_tile=row_tile, vocab_tile=vocab_tile, softcap=softcap)


def soft_vocab_loss(draft_hidden, target_hidden, lm_head, *, chunk: int = 8192, impl: str = "auto",
                    row_tile: int | None = None, vocab_tile: int | None = None, softcap: float | None = None):
    """Soft-target (Eagle3) reductions per row without materialising ``[..., V]``: (soft CE, L1, argmax match),
    as :func:`soft_vocab_loss_reference`. ``target_hidden`` is a constant (``stop_gradient``) on every path, as
    the XLA scan (:func:`dspark_jax.kernels.vocab_loss_chunked.soft_ce_chunked`) has always treated it. Arguments as in
    :func:`vocab_loss`."""
    kind, target = resolve(impl, "soft_vocab_loss")
    target_hidden = lax.stop_gradient(target_hidden)
    if kind == "xla":
        return soft_ce_chunked(draft_hidden, target_hidden, lm_head, chunk, softcap=softcap)
    return soft_vocab_loss_fused(draft_hidden, target_hidden, lm_head, backend=target, row_tile=row_tile,
                                 vocab_tile=vocab_tile, softcap=softcap)


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
    lead = target_ids.shape
    rows = math.prod(lead)
    vocab, hidden = lm_head.shape
    has_u = markov_u is not None
    dt = jnp.result_type(draft_hidden, target_hidden, lm_head, *((markov_u, markov_w2) if has_u else ()))
    cfg = _make_cfg(backend, rows, vocab, hidden, markov_u.shape[-1] if has_u else 1, dt, row_tile, vocab_tile,
                    softcap, False)
    flat = lambda x: x.reshape(rows, x.shape[-1]).astype(dt)  # noqa: E731
    ce, l1 = _fused(flat(draft_hidden), flat(target_hidden), flat(markov_u) if has_u else None, lm_head.astype(dt),
                    markov_w2.astype(dt) if has_u else None, target_ids.reshape(rows).astype(jnp.int32), cfg)
    return ce.reshape(lead), l1.reshape(lead)


def soft_vocab_loss_fused(draft_hidden, target_hidden, lm_head, *, backend: str = "tpu-interpret",
                          row_tile: int | None = None, vocab_tile: int | None = None, softcap: float | None = None):
    """:func:`vocab_loss_fused` with soft targets: ``(soft CE, L1, argmax match)`` per row, as
    :func:`soft_vocab_loss_reference`. Gradients reach ``target_hidden`` and ``lm_head`` too when they are
    differentiated (the CE's target-side term included)."""
    lead = draft_hidden.shape[:-1]
    rows = math.prod(lead)
    vocab, hidden = lm_head.shape
    dt = jnp.result_type(draft_hidden, target_hidden, lm_head)
    cfg = _make_cfg(backend, rows, vocab, hidden, 1, dt, row_tile, vocab_tile, softcap, True)
    flat = lambda x: x.reshape(rows, x.shape[-1]).astype(dt)  # noqa: E731
    ce, l1, match = _fused(flat(draft_hidden), flat(target_hidden), None, lm_head.astype(dt), None, None, cfg)
    return ce.reshape(lead), l1.reshape(lead), match.reshape(lead)


# ---- tile math shared by both drivers (row vectors are [tr, 1]) -------------------------------------------------
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
    """As :func:`_tpu_forward`."""
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
    """As :func:`_tpu_forward`."""
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


# ---- sharding: one custom_partitioning per Pallas forward / backward -------------------------------------------
# A pallas_call is a custom call the SPMD partitioner cannot split: under a sharded jit it would gather every
# operand and compute all rows on every device. Each launch is therefore wrapped so that it runs on the local
# shard of the rows. The weights are gathered for the call (every row needs the whole vocabulary) and the weight
# gradients, which sum over rows, are psum-ed over the row shards inside the partitioned computation.
_PARTITION = True


def _row_sharded(fn, args, row_args, outs):
    """``fn(*args) -> tuple`` on local shards. ``row_args[i]``: dim 0 of ``args[i]`` is the row axis (all other
    dims, and all of a non-row argument, are replicated for the call); ``outs``: per result ``(kind, ndim)``,
    kind ``"row"`` (dim 0 = rows, sharded like the inputs) or ``"sum"`` (a sum over rows: psum-ed, replicated).
    The row axis follows the first row argument whose dim 0 is sharded by mesh axes dividing it; with none, the
    call runs unsharded."""
    if not _PARTITION:
        return fn(*args)
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    def row_axes(mesh, arg_shapes):
        for is_row, a in zip(row_args, arg_shapes):
            spec = tuple(getattr(a.sharding, "spec", ())) if is_row and a.sharding is not None else ()
            ax = spec[0] if spec else None
            names = () if ax is None else (tuple(ax) if isinstance(ax, (tuple, list)) else (ax,))
            if names and a.shape[0] % math.prod(mesh.shape[n] for n in names) == 0:
                return names
        return ()

    def shardings(mesh, axes, kinds):
        spec0 = (axes[0] if len(axes) == 1 else axes) if axes else None
        return tuple(NamedSharding(mesh, PartitionSpec(spec0) if k == "row" else PartitionSpec()) for k in kinds)

    in_kinds = ["row" if r else "rep" for r in row_args]
    out_kinds = [k for k, _ in outs]

    def partition(mesh, arg_shapes, result_shape):
        axes = row_axes(mesh, arg_shapes)

        def lower(*local):
            res = fn(*local)
            return tuple(lax.psum(o, axes) if k == "sum" and axes else o for o, k in zip(res, out_kinds))

        return mesh, lower, shardings(mesh, axes, out_kinds), shardings(mesh, axes, in_kinds)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, row_axes(mesh, arg_shapes), out_kinds)

    # Shardy rule: only the row factor "n" is shared; every other dim has a factor of its own, so no sharding
    # of one operand's hidden / vocab dim is propagated onto another (the partition callback replicates them)
    def dims(prefix, ndim, row):
        return " ".join((["n"] if row else []) + [f"{prefix}d{k}" for k in range(int(row), ndim)])

    rule = (", ".join(dims(f"i{i}", a.ndim, r) for i, (a, r) in enumerate(zip(args, row_args))) + " -> "
            + ", ".join(dims(f"o{j}", nd, k == "row") for j, (k, nd) in enumerate(outs)))
    wrapped = custom_partitioning(fn)
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return tuple(wrapped(*args))


def _pad_rows(rows, padded):
    return lambda a: a if a is None or padded == rows else jnp.pad(a, [(0, padded - rows)] + [(0, 0)] * (a.ndim - 1))


_FWD_NAMES = ("hd", "ht", "u", "w", "w2", "ids")
_BWD_NAMES = ("hd", "ht", "u", "w", "w2", "lbl", "lse_d", "lse_t", "ad", "at", "dce", "dl1")
_WEIGHTS = ("w", "w2")


def _forward(cfg, hd, ht, u, w, w2, ids):
    """-> ``(ce, l1, lse_d, lse_t, a_d, a_t, tg)`` (+ the two argmaxes with soft targets), each ``[rows]``."""
    if cfg.kind == "xla":      # plain XLA ops: the SPMD partitioner handles them itself
        return _xla_forward(cfg, hd, ht, u, w, w2, ids)
    drv = _tpu_forward if cfg.kind == "tpu" else _gpu_forward
    named = [(n, a) for n, a in zip(_FWD_NAMES, (hd, ht, u, w, w2, ids)) if a is not None]

    def local(*arrs):
        x = dict(zip([n for n, _ in named], arrs))
        rows = x["hd"].shape[0]
        c = _fit_rows(cfg, rows)
        p = _pad_rows(rows, _round_up(rows, c.tr))
        res = drv(c, p(x["hd"]), p(x["ht"]), p(x.get("u")), x["w"], x.get("w2"), p(x.get("ids")))
        return tuple(o[:rows] for o in res)

    n_out = 9 if cfg.soft else 7
    return _row_sharded(local, [a for _, a in named], [n not in _WEIGHTS for n, _ in named], [("row", 1)] * n_out)


def _backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1):
    """-> dict of the needed gradients (fp32), None for the others."""
    if cfg.kind == "xla":
        return _xla_backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1)
    drv = _tpu_backward if cfg.kind == "tpu" else _gpu_backward
    named = [(n, a) for n, a in zip(_BWD_NAMES, (hd, ht, u, w, w2, lbl, *stats, dce, dl1)) if a is not None]
    outs_x = [n for n in ("hd", "u", "ht") if need[n]]
    outs_w = [n for n in _WEIGHTS if need[n]]
    grads = dict.fromkeys(("hd", "ht", "u", "w", "w2"))
    if not outs_x and not outs_w:
        return grads

    def local(*arrs):
        x = dict(zip([n for n, _ in named], arrs))
        rows = x["hd"].shape[0]
        c = _fit_rows(cfg, rows)
        p = _pad_rows(rows, _round_up(rows, c.tr))
        g = drv(c, need, p(x["hd"]), p(x["ht"]), p(x.get("u")), x["w"], x.get("w2"), p(x["lbl"]),
                tuple(p(x[n]) for n in ("lse_d", "lse_t", "ad", "at")), p(x["dce"]), p(x["dl1"]))
        return tuple(g[n][:rows] for n in outs_x) + tuple(g[n] for n in outs_w)

    res = _row_sharded(local, [a for _, a in named], [n not in _WEIGHTS for n, _ in named],
                       [("row", 2)] * len(outs_x) + [("sum", 2)] * len(outs_w))
    grads.update(zip(outs_x + outs_w, res))
    return grads


# ---- custom_vjp ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(hd, ht, u, w, w2, ids, cfg):
    """``(ce, l1)``; with soft targets (``ids`` None) ``(ce, l1, argmax match)``."""
    res = _forward(cfg, hd, ht, u, w, w2, ids)
    return (res[0], res[1], res[7] == res[8]) if cfg.soft else (res[0], res[1])


def _fused_fwd(hd, ht, u, w, w2, ids, cfg):
    # symbolic_zeros=True: each differentiable leaf arrives as CustomVJPPrimal(value, perturbed)
    val = lambda p: None if p is None else p.value  # noqa: E731
    pert = lambda p: p is not None and bool(p.perturbed)  # noqa: E731
    args = [val(a) for a in (hd, ht, u, w, w2, ids)]
    res = _forward(cfg, *args)
    ce, l1, stats, tg = res[0], res[1], res[2:6], res[6]
    out = (ce, l1, res[7] == res[8]) if cfg.soft else (ce, l1)
    # which gradients are needed is encoded in the residual's structure: () = needed, None = not
    flags = tuple(() if pert(p) else None for p in (hd, ht, u, w, w2))
    lbl = tg if cfg.soft else args[5]
    return out, (tuple(args[:5]), lbl, stats, flags)


def _zeros_if_symbolic(ct, like):
    from jax.custom_derivatives import SymbolicZero

    return jnp.zeros(like.shape, F32) if isinstance(ct, SymbolicZero) or ct is None else ct.astype(F32)


def _fused_bwd(cfg, res, cts):
    args, lbl, stats, flags = res
    hd, ht, u, w, w2 = args
    dce, dl1 = (_zeros_if_symbolic(c, stats[0]) for c in cts[:2])   # the argmax match has no gradient
    need = dict(zip(("hd", "ht", "u", "w", "w2"), (f is not None for f in flags)))
    grads = _backward(cfg, need, hd, ht, u, w, w2, lbl, stats, dce, dl1)
    out = []
    for name, x in zip(("hd", "ht", "u", "w", "w2"), (hd, ht, u, w, w2)):
        g = grads[name]
        out.append(None if g is None else g.astype(x.dtype))
    return (*out, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
