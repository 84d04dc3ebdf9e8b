"""The jitted draft calls that the DSpark / DFlash draft tests of every target family share (each compiled once per
draft kind and shape), and the train/infer consistency check they all pass."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.decode.sampling import SamplingConfig

SAMPLED = SamplingConfig(temperature=1.0)


@nnx.jit(static_argnames=("materialize_logits",))
def _train_forward(draft, ids, loss_mask, taps, last, anchors, keep, materialize_logits=True):
    return draft.train_forward(ids, loss_mask, taps, last, anchors, keep, materialize_logits=materialize_logits)


def fwd(draft, batch, anchors, keep, **kw):
    """``draft.train_forward`` of a test batch (``input_ids``, ``loss_mask``, ``target_hidden``,
    ``target_last_hidden``) at ``anchors`` / ``keep`` [B, N]."""
    return _train_forward(draft, batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                          batch["target_last_hidden"], jnp.asarray(anchors, jnp.int32), jnp.asarray(keep), **kw)


@nnx.jit(static_argnames=("sampling", "with_decode_head"))
def propose(draft, cache, ctx_taps, ctx_count, anchor, key, sampling=SAMPLED, with_decode_head=False):
    head_hv = draft.decode_head() if with_decode_head else None
    return draft.propose(cache, ctx_taps, ctx_count, anchor, key, sampling, head_hv=head_hv)


@nnx.jit
def block_hidden(draft, cache, ctx_taps, ctx_count, anchor):
    return draft.block_hidden(cache, ctx_taps, ctx_count, anchor)


def rows(x, idx):
    """x[b, idx[b]] for each row b."""
    return jnp.take_along_axis(x, jnp.asarray(idx)[:, None], axis=1)[:, 0]


def assert_rounds_match(d, batch, tol):
    """The context arrives through the cache over 3 rounds with ragged per-row counts (one of them 0) and junk
    padding rows; every round's block equals the training block at anchor = that round's start, and one call with
    the whole context on an empty cache."""
    taps, ids = batch["target_hidden"], batch["input_ids"]
    counts = np.array([[3, 0, 5], [4, 5, 2]])             # per round (columns) and row; row starts 3,3,8 / 4,9,11
    starts = np.cumsum(counts, axis=1)
    out = fwd(d, batch, jnp.asarray(starts), jnp.ones((2, 3), bool))
    p = 5
    junk = 10.0 * np.random.default_rng(3).standard_normal((2, p, taps.shape[-1]), np.float32)
    cache = d.init_cache(2, 16)
    for r in range(3):
        c = np.asarray(cache.lengths)
        ctx = np.array(junk)
        for b in range(2):
            ctx[b, :counts[b, r]] = taps[b, c[b]:c[b] + counts[b, r]]
        anchor = rows(ids, starts[:, r])
        hid, cache = block_hidden(d, cache, jnp.asarray(ctx), jnp.asarray(counts[:, r]), anchor)
        assert cache.lengths.tolist() == starts[:, r].tolist()
        np.testing.assert_allclose(hid, out.draft_hidden[:, r], **tol, err_msg=f"round {r}")
        # same as one call with the whole context on an empty cache
        whole, _ = block_hidden(d, d.init_cache(2, 16), taps[:, :11], jnp.asarray(starts[:, r]), anchor)
        np.testing.assert_allclose(hid, whole, **tol)


def assert_forced_block_matches(d, kind, batch, run_target, target, tol):
    """Makes the (sampled, T=1) proposal at starts (5, 3) the ground truth (ids after the anchor := the proposed
    tokens): the training forward at that anchor then reproduces propose's tokens, hidden states, corrected logits
    and confidence (none for ``kind`` dflash) -> (the proposal, the new ids' taps, the starts)."""
    ids0 = np.asarray(batch["input_ids"])
    starts = np.array([5, 3])
    anchor = jnp.asarray(ids0[[0, 1], starts])
    prop = propose(d, d.init_cache(2, 16), batch["target_hidden"][:, :5], jnp.asarray(starts), anchor,
                   jax.random.key(5), SAMPLED)
    ids1 = ids0.copy()
    for b in range(2):
        ids1[b, starts[b] + 1:starts[b] + 1 + d.config.block_size] = np.asarray(prop.tokens[b])
    taps1, last1, _ = run_target(target, jnp.asarray(ids1))
    batch1 = dict(input_ids=jnp.asarray(ids1), loss_mask=jnp.ones((2, 12), jnp.int32), target_hidden=taps1,
                  target_last_hidden=last1)
    out = fwd(d, batch1, jnp.array([[5, 1, 7], [3, 8, 0]]), jnp.ones((2, 3), bool))
    np.testing.assert_array_equal(out.target_ids[:, 0], prop.tokens)
    np.testing.assert_allclose(out.draft_hidden[:, 0], prop.block_hidden, **tol)
    np.testing.assert_allclose(out.draft_logits[:, 0], prop.logits, **tol)
    if kind == "dflash":
        assert prop.confidence_logits is None and out.confidence_logits is None
    else:
        np.testing.assert_allclose(out.confidence_logits[:, 0], prop.confidence_logits, **tol)
    return prop, taps1, starts
