"""Train-step throughput of a preset: online target features vs the offline cache, same batches.

Builds the preset's run (random target unless ``target.path`` is given; no pre-training: throughput only),
writes an offline cache of its data with ``write_target_cache``, then times ``--steps`` micro-steps of each
after ``--warmup`` steps (compilation excluded). Tokens/s counts real (unpadded) context tokens. Usage:

    python scripts/bench_train.py --config tiny [--steps 40] [--warmup 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np


def time_steps(trainer, steps: int, warmup: int) -> dict:
    state = trainer.initial_state()
    it = trainer.pipeline.iterator()
    for _ in range(warmup):
        state, m = trainer.step_fn(state, trainer.target_state, next(it))
    jax.block_until_ready(m)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        tokens += int(np.sum(batch["lengths"]))
        state, m = trainer.step_fn(state, trainer.target_state, batch)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return {"steps": steps, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
            "ms_per_step": 1e3 * dt / steps, "loss": float(m["loss"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from dspark_jax.train.config import load_train_config
    from dspark_jax.train.target_cache import write_target_cache
    from dspark_jax.train.trainer import Trainer

    work = tempfile.mkdtemp(prefix="bench_train_")
    base = [f"output_dir={work}/run", "target.pretrain_steps=0", "log.progress=false", "data.num_threads=2",
            f"optim.max_steps={args.steps + args.warmup}"]
    cfg = load_train_config(args.config, base + list(args.overrides))
    online = Trainer(cfg)
    t0 = time.perf_counter()
    write_target_cache(os.path.join(work, "cache"), online.samples, online.target,
                       target_layer_ids=tuple(cfg.draft.target_layer_ids), progress=False)
    cache_s = time.perf_counter() - t0
    offline = Trainer(cfg.with_overrides([f"data.cache_dir={work}/cache"]))
    res = {"config": args.config, "overrides": args.overrides, "machine": platform.processor() or platform.machine(),
           "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
           "cache_write_seconds": cache_s, "online": time_steps(online, args.steps, args.warmup),
           "offline": time_steps(offline, args.steps, args.warmup)}
    res["offline_over_online"] = res["offline"]["tokens_per_s"] / res["online"]["tokens_per_s"]
    print(json.dumps(res, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
