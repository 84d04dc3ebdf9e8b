"""Branching inside the decode loop without copying its caches.

XLA:CPU copies every buffer a ``cond`` / ``switch`` passes through, the KV caches included, each time one runs: a
scheduler loop whose rounds and verify plans were ``cond`` / ``switch`` branches ran 15-35% slower than the same
rounds with no branch (decode/spec_loop.py). A ``while`` loop of zero or one trip updates its carry in place, so
every branch point of the loop is written as such loops.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def run_if(pred, fn: Callable, c):
    """``fn(c)`` if ``pred`` (a traced bool) else ``c``, as a while loop of zero or one iteration. ``fn`` must
    return a pytree of ``c``'s structure, shapes and dtypes."""
    return jax.lax.while_loop(lambda s: s[0], lambda s: (jnp.bool_(False), fn(s[1])), (jnp.asarray(pred), c))[1]


def switch_in_place(index, branches: Sequence[Callable], carry):
    """``branches[index](carry)`` (index clamped to the last branch) as a chain of :func:`run_if`, one per branch.

    Each branch maps ``carry`` to a pytree of its structure, shapes and dtypes; the branches read what they need
    (e.g. the cache) from ``carry``, so what they update stays in place."""
    if len(branches) == 1:
        return branches[0](carry)
    index = jnp.minimum(jnp.asarray(index, jnp.int32), len(branches) - 1)
    for i, fn in enumerate(branches):
        carry = run_if(index == i, fn, carry)
    return carry
