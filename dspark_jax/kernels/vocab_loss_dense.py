"""The DSpark vocab reduction in one pass over the whole vocabulary, with a hand-written backward (XLA).

Same contract as :func:`dspark_jax.kernels.vocab_loss.vocab_loss_reference` (``(ce, l1)`` per row from hidden
states). Where the ``[rows, V]`` logits fit (the materialised-logits loss, and the chunked loss on CPU when one
chunk covers the vocabulary), this is what the XLA path runs: each logit product is computed once and the
backward uses the forward's probabilities, where autodiff of the reference (or the rematerialised chunk scan)
paid for

* a scatter of the CE's one-hot and a ``[V, rows]`` transposed copy of the log-softmax gradient (XLA:CPU:
  ~40 ms of a ~420 ms step at issue 28's H=256 workload),
* the logit products recomputed by the scan's checkpoints (three times each),
* gradients nobody needs: ``custom_vjp`` with symbolic zeros skips the frozen ``lm_head`` and the
  stop-gradient target hidden states.

Backward per row, with ``s = sign(p_d - p_t)``, ``a_d = sum_v p_d s``, ``a_t = sum_v p_t s`` (as in the fused
kernels)::

    g_d = dL1 * p_d * (s - a_d) + dCE * (p_d - onehot(y))      g_t = dL1 * p_t * (a_t - s)

Residuals: ``p_d``, ``p_t`` ``[rows, V]`` fp32 (the materialised path held the logits anyway), plus the
softcap derivatives when a cap is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from dspark_jax.kernels.vocab_loss_common import F32, _capped, _dot, _dot_nt, _sign

__all__ = ["vocab_loss_dense"]


def vocab_loss_dense(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, *,
                     softcap: float | None = None):
    """``(ce, l1)`` each ``[...]``. Args as :func:`~dspark_jax.kernels.vocab_loss.vocab_loss_reference`:
    draft_hidden / target_hidden ``[..., H]``, markov_u ``[..., r]`` or None, lm_head ``[V, H]``, markov_w2
    ``[V, r]`` or None, target_ids ``[...]``."""
    lead = target_ids.shape
    rows = 1
    for n in lead:
        rows *= n
    has_u = markov_u is not None
    dt = jnp.result_type(draft_hidden, target_hidden, lm_head, *((markov_u, markov_w2) if has_u else ()))
    flat = lambda x: x.reshape(rows, x.shape[-1]).astype(dt)  # noqa: E731
    ce, l1 = _dense(flat(draft_hidden), flat(target_hidden), flat(markov_u) if has_u else None, lm_head.astype(dt),
                    markov_w2.astype(dt) if has_u else None, target_ids.reshape(rows).astype(jnp.int32),
                    None if softcap is None else float(softcap))
    return ce.reshape(lead), l1.reshape(lead)


def _forward(hd, ht, u, w, w2, ids, cap):
    hp = hd.dtype == jnp.float32
    d, jd = _capped(_dot_nt(hd, w, hp), cap)
    if u is not None:
        d = d + _dot_nt(u, w2, hp)
    t, jt = _capped(_dot_nt(ht, w, hp), cap)
    lse_d = jax.nn.logsumexp(d, axis=-1, keepdims=True)
    lse_t = jax.nn.logsumexp(t, axis=-1, keepdims=True)
    p_d, p_t = jnp.exp(d - lse_d), jnp.exp(t - lse_t)
    diff = p_d - p_t
    l1 = jnp.sum(jnp.abs(diff), axis=-1)
    cols = lax.broadcasted_iota(jnp.int32, d.shape, 1)
    ce = lse_d[:, 0] - jnp.sum(jnp.where(cols == ids[:, None], d, 0.0), axis=-1)
    return ce, l1, p_d, p_t, (jd, jt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _dense(hd, ht, u, w, w2, ids, cap):
    ce, l1, *_ = _forward(hd, ht, u, w, w2, ids, cap)
    return ce, l1


def _dense_fwd(hd, ht, u, w, w2, ids, cap):
    val = lambda p: None if p is None else p.value  # noqa: E731
    pert = lambda p: p is not None and bool(p.perturbed)  # noqa: E731
    args = [val(a) for a in (hd, ht, u, w, w2, ids)]
    ce, l1, p_d, p_t, jac = _forward(*args, cap)
    flags = tuple(() if pert(p) else None for p in (hd, ht, u, w, w2))  # () = gradient needed, None = not
    return (ce, l1), (tuple(args[:5]), args[5], p_d, p_t, jac, flags)


def _ct(c, like):
    return jnp.zeros(like.shape, F32) if c is None or isinstance(c, SymbolicZero) else c.astype(F32)


def _dense_bwd(cap, res, cts):
    (hd, ht, u, w, w2), ids, p_d, p_t, (jd, jt), flags = res
    need = dict(zip(("hd", "ht", "u", "w", "w2"), (f is not None for f in flags)))
    dce, dl1 = (_ct(c, ids)[:, None] for c in cts)
    sg = _sign(p_d - p_t)
    a_d = jnp.sum(p_d * sg, axis=-1, keepdims=True)
    onehot = lax.broadcasted_iota(jnp.int32, p_d.shape, 1) == ids[:, None]
    g_d = dl1 * p_d * (sg - a_d) + dce * (p_d - onehot.astype(F32))
    g_dh = g_d if jd is None else g_d * jd
    g_t = None
    if need["ht"] or need["w"]:
        a_t = jnp.sum(p_t * sg, axis=-1, keepdims=True)
        g_t = dl1 * p_t * (a_t - sg)
        g_t = g_t if jt is None else g_t * jt
    hp = hd.dtype == jnp.float32
    cast = lambda g, x: g.astype(x.dtype)  # noqa: E731
    # the weight gradients contract the rows: [r, V] = u^T g, transposed at the end, so the [rows, V] gradient
    # is read in its own layout (XLA:CPU copied a [V, rows] transpose of it for g^T u)
    tdot = lambda a, g: lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=F32,  # noqa: E731
                                        precision=lax.Precision.HIGHEST if hp else None).T
    out = {
        "hd": _dot(cast(g_dh, w), w, hp) if need["hd"] else None,
        "u": _dot(cast(g_d, w2), w2, hp) if need["u"] else None,
        "ht": _dot(cast(g_t, w), w, hp) if need["ht"] else None,
        "w": (tdot(hd, cast(g_dh, hd)) + tdot(ht, cast(g_t, ht))) if need["w"] else None,
        "w2": tdot(u, cast(g_d, u)) if need["w2"] else None,
    }
    grads = tuple(None if out[n] is None else out[n].astype(x.dtype)
                  for n, x in zip(("hd", "ht", "u", "w", "w2"), (hd, ht, u, w, w2)))
    return (*grads, None)


_dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)
