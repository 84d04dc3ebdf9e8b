"""Lossless verification of a proposed block: speculative (rejection) sampling, spec §4.4.

Draft token ``i`` is accepted with probability ``min(1, p_t[i](t_i) / max(p_d[i](t_i), 1e-8))``; the first
rejection at ``m < L`` draws the next token from the normalised residual ``max(0, p_t[m] - p_d[m])``
(``p_t[m]`` when its mass is <= 1e-8); when all L are accepted the bonus comes from ``p_t[L]``. Both
distributions are the *warped* ones (temperature, top-k, top-p applied identically), so the output follows
the warped target distribution exactly. At temperature 0 both are one-hot argmaxes: accept while the draft
token equals the target argmax, then emit the target argmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.decode.sampling import SamplingConfig, argmax_last, categorical, split_keys, uniform, warp_logits

RESIDUAL_EPS = 1e-8


def probabilities(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``[..., V]`` logits -> fp32 probabilities of what is sampled: one-hot argmax when greedy."""
    if cfg.greedy:
        return jax.nn.one_hot(argmax_last(logits), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(warp_logits(logits, cfg), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verdict:
    """num_accepted ``[B]`` (m), next_token ``[B]`` (residual or bonus), accepted ``[B, Bs]`` per-position
    acceptance outcome (only meaningful for positions < L)."""

    num_accepted: jax.Array
    next_token: jax.Array
    accepted: jax.Array


def verify_block(draft_tokens: jax.Array, draft_logits: jax.Array, target_logits: jax.Array,
                 proposal_lengths: jax.Array, key: jax.Array, cfg: SamplingConfig) -> Verdict:
    """Rejection-samples one block per row.

    Args:
      draft_tokens: ``[B, Bs]`` proposed tokens; draft_logits: ``[B, Bs, V]`` the logits they were drawn from.
      target_logits: ``[B, Bs+1, V]`` target logits at ``[anchor, t_0 .. t_{Bs-1}]``.
      proposal_lengths: ``[B]`` L per row (0..Bs): only the first L drafts are verified.
      key: a PRNG key, or ``[B]`` row keys; cfg: sampling settings shared by draft and target.

    Traced under the profile name ``verify`` (``jax.named_scope``).
    """
    with jax.named_scope("verify"):
        if cfg.greedy:
            return _verify_greedy(draft_tokens, target_logits, proposal_lengths)
        return verify_block_general(draft_tokens, draft_logits, target_logits, proposal_lengths, key, cfg)


def verify_block_general(draft_tokens, draft_logits, target_logits, proposal_lengths, key,
                         cfg: SamplingConfig) -> Verdict:
    """The rule of spec §4.4 written once for every sampling setting (greedy = one-hot distributions);
    :func:`verify_block` uses it except at temperature 0, where a shortcut gives the same verdict."""
    b, bs = draft_tokens.shape
    p_t = probabilities(target_logits, cfg)                                    # [B, Bs+1, V]
    p_d = probabilities(draft_logits, cfg)                                     # [B, Bs, V]
    k_accept, k_next = split_keys(key, 2)            # one key, or [B] row keys (continuous batching)
    pt_tok = jnp.take_along_axis(p_t[:, :bs], draft_tokens[..., None], axis=-1)[..., 0]
    pd_tok = jnp.take_along_axis(p_d, draft_tokens[..., None], axis=-1)[..., 0]
    ratio = jnp.minimum(1.0, pt_tok / jnp.maximum(pd_tok, RESIDUAL_EPS))
    u = uniform(k_accept, (b, bs))
    accepted = (u < ratio) & (jnp.arange(bs)[None, :] < proposal_lengths[:, None])
    m = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)      # leading accepted count

    pt_m = jnp.take_along_axis(p_t, m[:, None, None], axis=1)[:, 0]           # [B, V]
    pd_m = jnp.take_along_axis(jnp.concatenate([p_d, jnp.zeros_like(p_d[:, :1])], axis=1), m[:, None, None],
                               axis=1)[:, 0]
    rejected = m < proposal_lengths
    residual = jnp.where(rejected[:, None], jnp.maximum(pt_m - pd_m, 0.0), pt_m)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > RESIDUAL_EPS, residual, pt_m)
    if cfg.greedy:
        next_token = argmax_last(residual)
    else:
        next_token = categorical(k_next, jnp.log(residual))
    return Verdict(num_accepted=m.astype(jnp.int32), next_token=next_token.astype(jnp.int32), accepted=accepted)


def _verify_greedy(draft_tokens: jax.Array, target_logits: jax.Array, proposal_lengths: jax.Array) -> Verdict:
    """Temperature 0: the general rule with one-hot distributions, without building them. A draft token (the
    argmax of its own logits) is accepted iff it equals the target argmax; the residual of a rejection is the
    target's one-hot argmax, and so is the bonus. Same result as the general path, a fraction of its work
    (no [B, Bs+1, V] probability tensors)."""
    bs = draft_tokens.shape[1]
    t_arg = argmax_last(target_logits)              # [B, Bs+1]
    accepted = (draft_tokens == t_arg[:, :bs]) & (jnp.arange(bs)[None, :] < proposal_lengths[:, None])
    m = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
    next_token = jnp.take_along_axis(t_arg, m[:, None], axis=1)[:, 0]
    return Verdict(num_accepted=m.astype(jnp.int32), next_token=next_token, accepted=accepted)
