"""Eagle3 TTT loss and metrics (spec §5; DeepSpec ``compute_eagle3_loss`` in ``deepspec/modeling/eagle3/loss.py``).

Per step ``j`` and position ``t``: soft cross-entropy ``-sum_v p_t(v) log p_d(v)`` of the draft against the
target's full distribution ``softmax(lm_head(last_hidden[t+j+1]))`` (uniform where ``t+j+1 >= S``), masked by
the step's position mask (``loss_mask`` with the last valid token zeroed, shifted left by ``j``), summed and
divided by ``B*S`` (every position, DeepSpec's ``local_mean``). Total: ``sum_j step_loss_decay**j * loss_j``.

Metrics (DeepSpec's names): ``ploss_j``, ``accuracy@j`` (draft argmax == target argmax over valid positions),
``accept_rate@j`` (mean of ``clip(1 - L1/2, 0, 1)``), ``valid_tokens@j``, ``tau_greedy``, ``tau_probabilistic``
and ``loss``.

The vocab reductions come either from materialised ``[T,B,S,V]`` logits (the reference) or, with
``vocab_chunk``, from hidden states through ``kernels.vocab_loss.soft_vocab_loss`` (``impl``: ``xla`` = the
chunked ``lax.scan`` of ``kernels/vocab_loss_chunked.py``, with running max/sum, rematerialised in the backward
pass; ``pallas`` = the fused vocab-loss kernels with soft targets; ``auto`` = Pallas on TPU/GPU). All three
per-position terms map onto the kernel: soft CE against the target's distribution, the L1 between the softmaxes, the
argmax match. Nothing of
Eagle3's stays on the XLA path: a pruned draft vocabulary (SpecForge ``d2t``/``t2d``) lives in
``config.draft_vocab`` and only restricts proposals; in training the loss runs over the full ``[V, H]``
``lm_head`` (the pruned rows scattered into it), identically on both paths, and the step weights / masking are
applied to the per-position results here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.drafts.config import DraftConfig
from dspark_jax.kernels.vocab_loss import soft_ce_from_logits, soft_vocab_loss

soft_ce_reference = soft_ce_from_logits
"""``[..., V]`` each -> (soft CE, L1 ``sum_v |p_d - p_t|``, argmax match), each ``[...]``; fp32 softmaxes."""


def eagle3_loss(outputs, config: DraftConfig, *, vocab_chunk: int | None = None, impl: str = "auto"):
    """Spec §5 Eagle3 loss.

    Args:
      outputs: an :class:`~dspark_jax.drafts.eagle3.Eagle3TrainOutput` from ``draft.train_forward``.
      config: the draft's config (``step_loss_decay``).
      vocab_chunk: if set, reduce over the vocab in chunks of this many rows (needs no materialised logits).
      impl: with ``vocab_chunk``, which vocab reduction (``kernels.vocab_loss.soft_vocab_loss``): ``xla`` = the
        chunked scan, ``pallas`` = the fused kernel, ``auto`` = Pallas on TPU/GPU, XLA on CPU (or
        ``$DSPARK_KERNEL_IMPL``).
    Returns:
      (loss scalar, metrics dict of scalars).
    """
    if vocab_chunk is None and outputs.draft_logits is None:
        raise ValueError("outputs carry no materialised logits: pass vocab_chunk or "
                         "train_forward(materialize_logits=True)")
    if vocab_chunk is None:
        ce, l1, correct = soft_ce_reference(outputs.draft_logits, outputs.target_logits)
    else:
        # [T,B,S,H] -> [B,T,S,H]: the kernels flatten the leading dims into rows, and only a batch-major order
        # keeps a batch-sharded array's rows contiguous per device (else the reshape would gather them)
        bmajor = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
        ce, l1, correct = (bmajor(r) for r in soft_vocab_loss(
            bmajor(outputs.draft_hidden), bmajor(outputs.target_hidden), outputs.lm_head, chunk=vocab_chunk,
            impl=impl, softcap=outputs.softcap))
    mask = outputs.position_mask.astype(jnp.float32)                                    # [T,B,S]
    n_steps, b, s = mask.shape
    valid = mask > 0
    step_loss = jnp.sum(jnp.where(valid, ce, 0.0), axis=(1, 2)) / float(b * s)   # [T]
    decay = jnp.asarray(float(config.step_loss_decay), jnp.float32) ** jnp.arange(n_steps, dtype=jnp.float32)
    loss = jnp.sum(decay * step_loss)
    return loss, _metrics(step_loss, loss, l1, correct, valid)


def _metrics(step_loss, loss, l1, correct, valid):
    sg = jax.lax.stop_gradient
    validf = valid.astype(jnp.float32)
    correctf = (correct & valid).astype(jnp.float32)
    accept = sg(jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0)) * validf
    count = jnp.sum(validf, axis=(1, 2))
    m = {"loss": sg(loss)}
    for j in range(step_loss.shape[0]):
        m[f"ploss_{j}"] = sg(step_loss[j])
        m[f"accuracy@{j}"] = jnp.sum(correctf[j]) / jnp.maximum(count[j], 1.0)
        m[f"accept_rate@{j}"] = jnp.sum(accept[j]) / jnp.maximum(count[j], 1.0)
        m[f"valid_tokens@{j}"] = count[j]
    start = validf[0]
    n = jnp.maximum(jnp.sum(start), 1.0)
    m["tau_greedy"] = (jnp.sum(jnp.cumprod(correctf, axis=0).sum(0) * start) + jnp.sum(start)) / n
    m["tau_probabilistic"] = (jnp.sum(jnp.cumprod(accept, axis=0).sum(0) * start) + jnp.sum(start)) / n
    return m
