"""DSpark / DFlash training loss (spec §3.4) and the logged metrics (spec §3.6).

Per slot k of each block: CE of the Markov-corrected draft logits against the dataset token, the L1 distance
``sum_v |p_d - p_t|`` to the target's distribution, and BCE-with-logits of the confidence head against the
stop-gradient soft target ``clip(1 - L1/2, 0, 1)``; each weighted by ``eval_mask * exp(-k/gamma)`` and
normalised by the weight sum.

The per-slot vocab reductions come in two forms that agree to float precision: from materialised
``[B,N,Bs,V]`` logits (the reference), or from hidden states in vocab chunks (a ``lax.scan`` with running
max/sum, rematerialised in the backward pass) so ``[.., V]`` fp32 arrays never exist in full.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.drafts.config import DraftConfig
from dspark_jax.kernels.vocab_loss import vocab_loss
from dspark_jax.kernels.vocab_loss_dense import vocab_loss_dense


def slot_weights(eval_mask: jax.Array, config: DraftConfig) -> jax.Array:
    """``[B,N,Bs]`` loss weights ``eval_mask * exp(-k / gamma)`` (k = 0-based slot).

    The paper's ``exp(-(k-1)/gamma)`` counts k from 1, which is the same curve; what differs is gamma
    (paper: the block size, 7; code: 4.0). ``config.paper_loss_weights`` switches the gamma default."""
    k = jnp.arange(eval_mask.shape[-1], dtype=jnp.float32)
    return eval_mask.astype(jnp.float32) * jnp.exp(-k / config.gamma)


def slot_ce_l1_reference(draft_logits, target_logits, target_ids):
    """From materialised logits: (CE ``[B,N,Bs]``, L1 ``[B,N,Bs]``), fp32 softmaxes."""
    logp_d = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp_d, target_ids[..., None], axis=-1)[..., 0]
    p_t = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
    l1 = jnp.sum(jnp.abs(jnp.exp(logp_d) - p_t), axis=-1)
    return ce, l1


def dspark_loss(outputs, config: DraftConfig, *, vocab_chunk: int | None = None, impl: str = "auto"):
    """Spec §3.4 loss and §3.6 metrics.

    Args:
      outputs: a :class:`DraftTrainOutput` from ``draft.train_forward``.
      config: the draft's config (loss weights, gamma; DFlash = CE only).
      vocab_chunk: if set, reduce over the vocab in chunks of this many rows (needs no materialised logits).
        None: from the materialised logits when ``outputs`` has them, else from the hidden states over the whole
        vocab in one pass (``kernels.vocab_loss_dense``: same values, a cheaper backward).
      impl: with ``vocab_chunk``, which vocab reduction (``kernels.vocab_loss``): ``xla`` = the scan below,
        ``pallas`` = the fused kernel, ``auto`` = Pallas on TPU/GPU, XLA on CPU (or ``$DSPARK_KERNEL_IMPL``).
    Returns:
      (loss scalar, metrics dict of scalars: ce, l1, bce, accept_rate@k, tau_probabilistic, weight_sum,
      conf_abs_error, conf_bias, conf_cumprod_bias).
    """
    if vocab_chunk is None and outputs.draft_logits is not None:
        ce, l1 = slot_ce_l1_reference(outputs.draft_logits, outputs.target_logits, outputs.target_ids)
    elif vocab_chunk is None:   # whole-vocab logits from the hidden states, one pass, hand-written backward
        ce, l1 = vocab_loss_dense(outputs.draft_hidden, outputs.target_hidden, outputs.markov_u, outputs.lm_head,
                                  outputs.markov_w2, outputs.target_ids, softcap=outputs.softcap)
    else:
        ce, l1 = vocab_loss(outputs.draft_hidden, outputs.target_hidden, outputs.markov_u, outputs.lm_head,
                            outputs.markov_w2, outputs.target_ids, chunk=vocab_chunk, impl=impl,
                            softcap=outputs.softcap)
    mask = outputs.eval_mask.astype(jnp.float32)
    w = slot_weights(mask, config)
    w_sum = jnp.sum(w)
    alpha_ce, alpha_l1, alpha_conf = config.loss_alphas
    accept = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0))
    numer = alpha_ce * jnp.sum(w * ce) + alpha_l1 * jnp.sum(w * l1)
    bce = None
    if outputs.confidence_logits is not None:
        z = outputs.confidence_logits
        bce = jax.nn.softplus(z) - accept * z
        numer = numer + alpha_conf * jnp.sum(w * bce)
    loss = numer / (w_sum + 1e-6)
    metrics = _metrics(ce, l1, bce, accept, w, w_sum, mask, outputs.confidence_logits)
    return loss, metrics


def _metrics(ce, l1, bce, accept, w, w_sum, mask, conf_logits):
    sg = jax.lax.stop_gradient
    safe_w = jnp.where(w_sum > 0, w_sum, 1.0)
    m = {"ce": sg(jnp.sum(w * ce) / safe_w), "l1": sg(jnp.sum(w * l1) / safe_w), "weight_sum": sg(w_sum)}
    per_k_mask = jnp.sum(mask, axis=(0, 1))
    per_k = jnp.sum(accept * mask, axis=(0, 1)) / jnp.maximum(per_k_mask, 1.0)
    for k in range(mask.shape[-1]):
        m[f"accept_rate@{k}"] = per_k[k]
    survive = jnp.cumprod(accept * mask, axis=-1)                         # [B, N, Bs]
    block_valid = mask[..., 0]
    m["tau_probabilistic"] = jnp.sum((1.0 + survive.sum(-1)) * block_valid) / jnp.maximum(block_valid.sum(), 1.0)
    if bce is not None:
        n_mask = jnp.maximum(mask.sum(), 1.0)
        conf = jax.nn.sigmoid(sg(conf_logits))
        m["bce"] = sg(jnp.sum(w * bce) / safe_w)
        m["conf_abs_error"] = jnp.sum(jnp.abs(conf - accept) * mask) / n_mask
        m["conf_bias"] = jnp.sum((conf - accept) * mask) / n_mask
        m["conf_cumprod_bias"] = jnp.sum((jnp.cumprod(conf, -1) - jnp.cumprod(accept, -1)) * mask) / n_mask
    return m
