"""What the benchmark scripts share that runs JAX: a median timer, the device's name and the random Qwen3 targets
whose geometry follows their hidden size."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

import dspark_jax as dj


def median_time(fn, repeats: int):
    """``fn()`` once untimed (it compiles), then ``repeats`` timed calls, each waited for (``block_until_ready``)
    -> (the last call's output, the median seconds of a call)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def device_kind() -> str:
    """The first device's kind (``cpu``, ``NVIDIA H100 80GB HBM3``, ``TPU v5 lite``)."""
    return jax.devices()[0].device_kind


def random_qwen3_config(hidden: int, layers: int, vocab: int, min_heads: int = 1, **fields) -> dj.TargetConfig:
    """A Qwen3 geometry scaled by its hidden size H: FFN 3H, max(min_heads, H/64) query heads and max(1, H/128) KV
    heads of 64; ``fields`` adds to it (``eos_token_id``, ``initializer_range``)."""
    return dj.TargetConfig(model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                           num_hidden_layers=layers, num_attention_heads=max(min_heads, hidden // 64),
                           num_key_value_heads=max(1, hidden // 128), head_dim=64, **fields)


def spread_taps(layers: int, first: int) -> tuple[int, ...]:
    """Three draft taps spread from layer ``first`` to layer ``layers - 2``."""
    return tuple(int(i) for i in np.linspace(first, layers - 2, 3).round())
