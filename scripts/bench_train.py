"""Train-step throughput of a preset: online target features vs the offline cache, same batches.

Builds the preset's run (random target unless ``target.path`` is given; no pre-training: throughput only),
writes an offline cache of its data with ``write_target_cache``, then times ``--steps`` micro-steps of each
after ``--warmup`` steps (compilation excluded). Tokens/s counts real (unpadded) context tokens. Usage:

    python scripts/bench_train.py --config tiny [--steps 40] [--warmup 5] [key=value ...]

``--packing`` compares unpacked batches with ``data.packing=true`` instead (both online, same config): the
padding fraction of the first epoch and tokens/s, the two interleaved in ``--rounds`` rounds of ``--steps``
steps each (medians reported; the ratio is the median of the per-round ratios). A packed step holds more tokens
per row but the same anchor budget per row. ``--config`` also takes a run's ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from _bench_common import add_options, machine, parser, write_json


def run_steps(trainer, state, it, steps: int):
    """``steps`` timed steps from ``state`` -> (state, last metrics, real tokens, seconds)."""
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        tokens += int(np.sum(batch["lengths"]))
        state, m = trainer.step_fn(state, trainer.target_state, batch)
    jax.block_until_ready((state, m))
    return state, m, tokens, time.perf_counter() - t0


def time_steps(trainer, steps: int, warmup: int) -> dict:
    state = trainer.initial_state()
    it = trainer.pipeline.iterator()
    for _ in range(warmup):
        state, m = trainer.step_fn(state, trainer.target_state, next(it))
    jax.block_until_ready(m)
    state, m, tokens, dt = run_steps(trainer, state, it, steps)
    return {"steps": steps, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
            "ms_per_step": 1e3 * dt / steps, "loss": float(m["loss"])}


def compare_packing(cfg, work: str, steps: int, warmup: int, rounds: int) -> dict:
    """Unpacked vs packed (``data.packing``) trainers of ``cfg``, timed in alternating rounds."""
    from dspark_jax.train.trainer import Trainer

    runs = {"unpacked": Trainer(cfg.with_overrides([f"output_dir={work}/unpacked"])),
            "packed": Trainer(cfg.with_overrides([f"output_dir={work}/packed", "data.packing=true"]))}
    live = {}
    for name, tr in runs.items():
        state, it = tr.initial_state(), tr.pipeline.iterator()
        for _ in range(warmup):
            state, m = tr.step_fn(state, tr.target_state, next(it))
        jax.block_until_ready(m)
        live[name] = [state, it]
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, tr in runs.items():
            state, it = live[name]
            state, _, tokens, dt = run_steps(tr, state, it, steps)
            rates[name].append(tokens / dt)
            live[name] = [state, it]
    out = {}
    for name, tr in runs.items():
        p = tr.pipeline
        out[name] = {"rows": len(p.samples), "rows_per_step": p.sampler.micro_batch_size,
                     "padding_fraction": p.padding_fraction(),
                     "tokens_per_s_median": float(np.median(rates[name])), "tokens_per_s_rounds": rates[name]}
    # the ratio within each round (the shared machine's speed drifts between rounds, less within one)
    out["packed_over_unpacked"] = float(np.median(np.asarray(rates["packed"]) / np.asarray(rates["unpacked"])))
    return out


def report(res: dict, json_out: str | None) -> None:
    """Printed as indented JSON, and written to ``json_out`` if given."""
    print(json.dumps(res, indent=2))
    write_json(json_out, res)


def main(argv=None):
    ap = parser(__doc__)
    add_options(ap, config="tiny", steps=40, warmup=5, json_out=None)
    ap.add_argument("--packing", action="store_true", help="unpacked vs data.packing=true instead")
    ap.add_argument("--rounds", type=int, default=5, help="--packing: alternating timing rounds")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from dspark_jax.train.config import load_train_config
    from dspark_jax.train.target_cache import write_target_cache
    from dspark_jax.train.trainer import Trainer

    work = tempfile.mkdtemp(prefix="bench_train_")
    base = [f"output_dir={work}/run", "target.pretrain_steps=0", "log.progress=false", "data.num_threads=2",
            f"optim.max_steps={args.steps + args.warmup}"]
    cfg = load_train_config(args.config, base + list(args.overrides))
    if args.packing:
        # enough epochs that neither pipeline runs dry (throughput only: the schedule does not matter)
        cfg = cfg.with_overrides([f"optim.max_steps={args.steps * args.rounds + args.warmup}", "optim.epochs=1000"])
        res = {"config": args.config, "overrides": args.overrides, "devices": [d.device_kind for d in jax.devices()],
               "jax": jax.__version__, **compare_packing(cfg, work, args.steps, args.warmup, args.rounds)}
        return report(res, args.json_out)
    online = Trainer(cfg)
    t0 = time.perf_counter()
    write_target_cache(os.path.join(work, "cache"), online.samples, online.target,
                       target_layer_ids=tuple(cfg.draft.target_layer_ids), progress=False)
    cache_s = time.perf_counter() - t0
    offline = Trainer(cfg.with_overrides([f"data.cache_dir={work}/cache"]))
    res = {"config": args.config, "overrides": args.overrides, "machine": machine(),
           "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
           "cache_write_seconds": cache_s, "online": time_steps(online, args.steps, args.warmup),
           "offline": time_steps(offline, args.steps, args.warmup)}
    res["offline_over_online"] = res["offline"]["tokens_per_s"] / res["online"]["tokens_per_s"]
    report(res, args.json_out)


if __name__ == "__main__":
    main()
