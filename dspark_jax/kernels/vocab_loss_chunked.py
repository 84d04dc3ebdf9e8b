"""The vocabulary reductions of the training losses as ``lax.scan``s over vocab chunks (the ``impl="xla"`` path of
:func:`dspark_jax.kernels.vocab_loss.vocab_loss` / ``soft_vocab_loss``): running max / sum, rematerialised in the
backward pass, so no ``[..., V]`` fp32 array exists in full.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_softcap(x, cap: float | None):
    """``cap * tanh(x / cap)`` (identity for None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def vocab_chunk_size(vocab: int, wanted: int) -> int:
    """The largest divisor of ``vocab`` that is <= ``wanted`` (and >= wanted/4), else ``wanted`` (padding)."""
    for c in range(min(wanted, vocab), max(1, wanted // 4) - 1, -1):
        if vocab % c == 0:
            return c
    return min(wanted, vocab)


def slot_ce_l1_chunked(draft_hidden, target_hidden, markov_u, lm_head, markov_w2, target_ids, chunk: int, *,
                       softcap: float | None = None):
    """Same as :func:`slot_ce_l1_reference` without materialising ``[.., V]``.

    Args: draft_hidden / target_hidden ``[..., H]``; markov_u ``[..., r]`` or None; lm_head ``[V, H]``;
    markov_w2 ``[V, r]`` or None; target_ids ``[...]``; chunk: vocab rows per step; softcap: ``cap`` of
    ``cap * tanh(x / cap)`` on the lm_head logits (draft and target, before the Markov bias) or None.
    """
    vocab = lm_head.shape[0]
    c = vocab_chunk_size(vocab, chunk)
    n_chunks = -(-vocab // c)
    pad = n_chunks * c - vocab
    f32 = jnp.float32
    hd, ht = draft_hidden.astype(f32), target_hidden.astype(f32)
    u = None if markov_u is None else markov_u.astype(f32)

    def chunked(w):  # kept in its dtype: cast per chunk below (no full fp32 copy of [V, H])
        if pad:
            w = jnp.pad(w, ((0, pad), (0, 0)))
        return w.reshape(n_chunks, c, w.shape[-1])

    w_head = chunked(lm_head)
    w_markov = None if markov_w2 is None else chunked(markov_w2)
    valid = (jnp.arange(n_chunks * c) < vocab).reshape(n_chunks, c)

    def logits_of(i):
        wi = w_head[i].astype(f32)
        d = apply_softcap(jnp.einsum("...h,vh->...v", hd, wi), softcap)
        if u is not None:
            d = d + jnp.einsum("...r,vr->...v", u, w_markov[i].astype(f32))
        t = apply_softcap(jnp.einsum("...h,vh->...v", ht, wi), softcap)
        neg = jnp.where(valid[i], 0.0, -jnp.inf)
        return d + neg, t + neg

    @jax.checkpoint
    def lse_body(carry, i):
        md, sd, mt, st = carry
        d, t = logits_of(i)
        nmd, nmt = jnp.maximum(md, d.max(-1)), jnp.maximum(mt, t.max(-1))
        sd = sd * jnp.exp(md - nmd) + jnp.exp(d - nmd[..., None]).sum(-1)
        st = st * jnp.exp(mt - nmt) + jnp.exp(t - nmt[..., None]).sum(-1)
        return (nmd, sd, nmt, st), None

    lead = target_ids.shape
    init = (jnp.full(lead, -jnp.inf, f32), jnp.zeros(lead, f32), jnp.full(lead, -jnp.inf, f32), jnp.zeros(lead, f32))
    (md, sd, mt, st), _ = jax.lax.scan(lse_body, init, jnp.arange(n_chunks))
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)

    @jax.checkpoint
    def l1_body(acc, i):
        d, t = logits_of(i)
        return acc + jnp.abs(jnp.exp(d - lse_d[..., None]) - jnp.exp(t - lse_t[..., None])).sum(-1), None

    l1, _ = jax.lax.scan(l1_body, jnp.zeros(lead, f32), jnp.arange(n_chunks))
    tgt_logit = apply_softcap(jnp.einsum("...h,...h->...", hd, jnp.take(lm_head, target_ids, axis=0).astype(f32)),
                              softcap)
    if u is not None:
        tgt_logit = tgt_logit + jnp.einsum("...r,...r->...", u, jnp.take(markov_w2, target_ids, axis=0).astype(f32))
    return lse_d - tgt_logit, l1


def soft_ce_chunked(draft_hidden, target_hidden, lm_head, chunk: int, *, softcap: float | None = None):
    """Same as :func:`soft_ce_reference` from post-norm hidden states ``[..., H]`` and ``lm_head [V, H]``,
    without materialising ``[..., V]`` (a zero target hidden state gives the uniform distribution, softcapped or
    not); ``softcap``: ``cap`` of ``cap * tanh(x / cap)`` on both logits, or None."""
    vocab = lm_head.shape[0]
    c = vocab_chunk_size(vocab, chunk)
    n_chunks = -(-vocab // c)
    pad = n_chunks * c - vocab
    f32 = jnp.float32
    hd, ht = draft_hidden.astype(f32), jax.lax.stop_gradient(target_hidden.astype(f32))
    w = lm_head.astype(f32)
    if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)))
    w = w.reshape(n_chunks, c, w.shape[-1])
    valid = (jnp.arange(n_chunks * c) < vocab).reshape(n_chunks, c)

    def logits_of(i):
        neg = jnp.where(valid[i], 0.0, -jnp.inf)
        return (apply_softcap(jnp.einsum("...h,vh->...v", hd, w[i]), softcap) + neg,
                apply_softcap(jnp.einsum("...h,vh->...v", ht, w[i]), softcap) + neg)

    lead = draft_hidden.shape[:-1]

    @jax.checkpoint
    def pass1(carry, i):
        md, sd, ad, mt, st, at = carry
        d, t = logits_of(i)
        cd, ct = d.max(-1), t.max(-1)
        id_, it = jnp.argmax(d, -1) + i * c, jnp.argmax(t, -1) + i * c
        ad, at = jnp.where(cd > md, id_, ad), jnp.where(ct > mt, it, at)
        nmd, nmt = jnp.maximum(md, cd), jnp.maximum(mt, ct)
        sd = sd * jnp.exp(md - nmd) + jnp.exp(d - nmd[..., None]).sum(-1)
        st = st * jnp.exp(mt - nmt) + jnp.exp(t - nmt[..., None]).sum(-1)
        return (nmd, sd, ad, nmt, st, at), None

    ninf, zero, izero = jnp.full(lead, -jnp.inf, f32), jnp.zeros(lead, f32), jnp.zeros(lead, jnp.int32)
    (md, sd, ad, mt, st, at), _ = jax.lax.scan(pass1, (ninf, zero, izero, ninf, zero, izero), jnp.arange(n_chunks))
    lse_d, lse_t = md + jnp.log(sd), mt + jnp.log(st)

    @jax.checkpoint
    def pass2(carry, i):
        cross, l1 = carry
        d, t = logits_of(i)
        p_t = jnp.exp(t - lse_t[..., None])
        # mask d, not the product: a padded column's p_t * (-inf) would send 0 * -inf = NaN into the
        # gradient of p_t (of lm_head, when it is differentiated)
        cross = cross + jnp.sum(p_t * jnp.where(valid[i], d, 0.0), -1)
        l1 = l1 + jnp.sum(jnp.abs(jnp.exp(d - lse_d[..., None]) - p_t), -1)
        return (cross, l1), None

    (cross, l1), _ = jax.lax.scan(pass2, (zero, zero), jnp.arange(n_chunks))
    return lse_d - cross, l1, ad == at
