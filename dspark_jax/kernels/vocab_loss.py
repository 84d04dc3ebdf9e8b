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
(:func:`~dspark_jax.kernels.vocab_loss_partition._row_sharded`): the kernels run on each device's shard of the
rows, the ``[V, .]`` weights are gathered for the call, and the weight gradients (sums over rows) are
``psum``-ed over the row shards.

Modules: this one holds the references, the dispatch and the fused algorithm's ``custom_vjp`` (which routes each
forward / backward to a driver); ``vocab_loss_common`` the configuration, tiles and the tile math the drivers
share; ``vocab_loss_tpu``, ``vocab_loss_gpu`` and ``vocab_loss_xla`` the three drivers; ``vocab_loss_partition``
the ``custom_partitioning`` wrapper; ``vocab_loss_chunked`` the ``impl="xla"`` scan; ``vocab_loss_dense`` the
one-pass XLA path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from dspark_jax.kernels._dispatch import resolve
from dspark_jax.kernels.vocab_loss_chunked import apply_softcap, slot_ce_l1_chunked, soft_ce_chunked  # noqa: F401
from dspark_jax.kernels.vocab_loss_common import F32, _fit_rows, _make_cfg, _round_up
from dspark_jax.kernels.vocab_loss_dense import vocab_loss_dense
from dspark_jax.kernels.vocab_loss_gpu import _gpu_backward, _gpu_forward
from dspark_jax.kernels.vocab_loss_partition import _row_sharded
from dspark_jax.kernels.vocab_loss_tpu import _tpu_backward, _tpu_forward
from dspark_jax.kernels.vocab_loss_xla import _xla_backward, _xla_forward

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
    :func:`~dspark_jax.kernels.vocab_loss_dense.vocab_loss_dense` instead); ``row_tile`` / ``vocab_tile`` the
    Pallas tiles (None: per backend defaults, clipped to the problem). Same contract as
    :func:`vocab_loss_reference` (``softcap`` included).
    """
    if (markov_u is None) != (markov_w2 is None):
        raise ValueError("markov_u and markov_w2 come together (both None without a Markov head)")
    kind, target = resolve(impl, "vocab_loss")
    if kind == "xla" and chunk >= lm_head.shape[0]:
        # one chunk is the whole vocab: the scan would only recompute the logits (three times each)
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


def vocab_loss_fused(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *,
                      backend: str = "tpu-interpret", row_tile: int | None = None, vocab_tile: int | None = None,
                      softcap: float | None = None):
    """The fused algorithm (custom_vjp, two vocab passes, hand-written backward) on one driver.

    ``backend``: ``"tpu"`` (Mosaic) / ``"gpu"`` (Triton) Pallas kernels, compiled; ``"tpu-interpret"`` /
    ``"gpu-interpret"``: the same kernels in Pallas interpret mode (any backend, for tests); ``"xla"``: the same
    tile math as plain XLA ops in a ``fori_loop`` over vocab chunks (all rows at once), which XLA's memory plan
    can see on any backend. Tiles default per driver (``vocab_loss_common``'s ``TPU_TILES``, ``GPU_TILES``,
    ``XLA_VOCAB_TILE``).
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


# ---- the drivers per row shard -------------------------------------------------------------------------------
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
