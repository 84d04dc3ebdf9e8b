"""Learning-rate schedule and optimizer of DeepSpec training (spec §3.5).

The schedule is DeepSpec's, exactly: with ``T`` optimizer steps and ``W = int(warmup_ratio * T)`` warm-up
steps, the s-th update (0-based) uses ``peak * (s+1) / W`` for ``s < W`` (so the first update already has a
non-zero rate and update ``W-1`` reaches the peak), then a cosine from the peak to 0 over the remaining
``T - W`` updates: ``peak * 0.5 * (1 + cos(pi * (s - W) / (T - W)))``. This differs from
``optax.warmup_cosine_decay_schedule`` (whose warm-up starts at 0 at step 0), hence the hand-written function.

The optimizer is torch's AdamW as DeepSpec's ``BF16Optimizer`` uses it (beta 0.9/0.999, eps 1e-8, decoupled
weight decay, default 0), after global-norm clipping at 1.0. optax's ``scale_by_adam`` computes
``m_hat / (sqrt(v_hat) + eps)`` like torch, and ``add_decayed_weights`` before the learning-rate scale gives
torch's ``p -= lr * wd * p``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_ratio: float = 0.04) -> int:
    """``W = int(warmup_ratio * T)`` (DeepSpec truncates, it does not round)."""
    return int(warmup_ratio * total_steps)


def dspark_lr_schedule(peak_lr: float, total_steps: int, warmup_ratio: float = 0.04) -> optax.Schedule:
    """Spec §3.5 schedule: linear warm-up ``peak*(s+1)/W`` for ``s < W``, then cosine to 0 at ``s = T``.

    Args:
      peak_lr: the peak learning rate.
      total_steps: ``T``, the number of optimizer updates (not micro-steps).
      warmup_ratio: ``W = int(warmup_ratio * T)``; ``W = 0`` means no warm-up (cosine from step 0).
    Returns:
      an optax schedule ``count -> lr`` (jit-safe; counts past ``T`` give 0).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    t = int(total_steps)
    w = warmup_steps(t, warmup_ratio)
    decay_len = float(max(t - w, 1))
    peak = float(peak_lr)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = peak * (s + 1.0) / float(max(w, 1))
        frac = jnp.clip((s - w) / decay_len, 0.0, 1.0)
        cos = peak * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < w, warm, cos)

    return schedule


def make_optimizer(peak_lr: float, total_steps: int, warmup_ratio: float = 0.04, *, weight_decay: float = 0.0,
                   clip: float | None = 1.0, grad_accum: int = 1, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip)`` + AdamW (torch defaults) on :func:`dspark_lr_schedule`.

    Args:
      peak_lr, total_steps, warmup_ratio: the schedule (``total_steps`` counts optimizer updates).
      weight_decay: decoupled weight decay (DeepSpec: 0). Applied to every trainable parameter, as torch does
        when no parameter groups are given.
      clip: global-norm clip threshold (None: no clipping). With accumulation it clips the averaged gradient
        once per update, like DeepSpec's clip before ``optimizer.step()``.
      grad_accum: micro-steps per update (> 1 wraps everything in ``optax.MultiSteps``, which averages the
        micro-step gradients; the schedule then advances once per update, not per micro-step).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    parts = []
    if clip is not None:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.adamw(dspark_lr_schedule(peak_lr, total_steps, warmup_ratio), b1=b1, b2=b2, eps=eps,
                             weight_decay=float(weight_decay)))
    tx = optax.chain(*parts)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(grad_accum))
    return tx


def optimizer_update_count(opt_state) -> jnp.ndarray:
    """How many optimizer updates ``opt_state`` has applied (the schedule's count: the index of the next
    update). Works for :func:`make_optimizer` states with and without accumulation."""
    def is_schedule_count(path, _):
        last = path[-1] if path else None
        return getattr(last, "tuple_name", None) == "ScaleByScheduleState"

    return optax.tree_utils.tree_get(opt_state, "count", filtering=is_schedule_count)


__all__ = ["dspark_lr_schedule", "make_optimizer", "warmup_steps", "optimizer_update_count"]
