"""Fitting a small target from scratch (next-token cross-entropy), for CPU demos and tests.

Drafts imitate their target; a randomly initialised target has a flat, structureless distribution that no
draft can learn to predict several tokens ahead. The ``tiny`` presets therefore first train the target itself
on the training conversations for a few hundred steps (``target.pretrain_steps``). This is not meant for real
targets (those come as checkpoints).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from dspark_jax.train.data import InputPipeline


def next_token_loss(logits: jax.Array, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean CE of predicting ``input_ids[:, t+1]`` from position ``t`` over real (unpadded) positions.

    logits ``[B, S, V]``, input_ids ``[B, S]``, lengths ``[B]`` -> scalar."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    valid = jnp.arange(input_ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def fit_target(target: nnx.Module, samples: Sequence[Mapping[str, np.ndarray]], *, steps: int, lr: float = 3e-3,
               batch_size: int = 16, max_length: int, buckets: Sequence[int] | None = None, seed: int = 0,
               progress: bool = True, log: Callable[[str], None] | None = None,
               compiler_options: Mapping | None = None) -> list[float]:
    """Trains every parameter of ``target`` in place for ``steps`` AdamW steps (warm-up 5%, cosine to 0, clip 1).

    Args:
      target: a target module (e.g. ``build_target(tiny_config, dtype="float32")``).
      samples: ``{"input_ids": int[S], ...}`` dicts (as ``read_jsonl`` returns); whole sequences are modelled.
      batch_size: sequences per step (capped at the number of samples).
      max_length, buckets: padding as in :class:`~dspark_jax.train.data.InputPipeline`.
    Returns:
      the loss of every step (host floats).
    """
    if steps < 1:
        return []
    batch_size = min(int(batch_size), len(samples))
    pipe = InputPipeline(samples, global_batch_size=batch_size, max_length=max_length, buckets=buckets, seed=seed,
                         num_epochs=None, process_index=0, process_count=1, num_threads=0)
    graphdef, params, rest = nnx.split(target, nnx.Param, ...)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, compiler_options=dict(compiler_options) if compiler_options else None)
    def step(params, opt_state, ids, lengths):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(ids)
            return next_token_loss(out.logits, ids, lengths)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    it = iter(pipe)
    bar = None
    if progress:
        bar = tqdm(total=steps, desc="pretrain target", unit="step", leave=False)
    losses = []
    for s in range(steps):
        batch = next(it)
        params, opt_state, loss = step(params, opt_state, batch["input_ids"], batch["lengths"])
        if bar is not None and (s % 10 == 0 or s == steps - 1):
            bar.set_postfix(loss=f"{float(loss):.3f}")
        losses.append(loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    losses = [float(x) for x in jax.device_get(losses)]
    nnx.update(target, params)
    if log is not None:
        log(f"target pretraining: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses


__all__ = ["fit_target", "next_token_loss"]
