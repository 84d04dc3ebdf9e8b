"""``dspark train`` and ``dspark prepare-cache``.

Examples::

    dspark train --config tiny                                  # CPU, ~1-2 minutes, nothing to download
    dspark train --config qwen3-4b-dspark target.path=/ckpt/Qwen3-4B data.train_files=[train.jsonl]
    dspark train --config qwen3-4b-dspark --dry-run --num-devices 64 --device v5e mesh.fsdp=16 mesh.tensor=4
    dspark prepare-cache --config qwen3-4b-dspark target.path=... data.train_files=[...] --out /data/cache
    dspark train --config qwen3-4b-dspark ... data.cache_dir=/data/cache   # train from the offline cache

Multi-host (docs/DISTRIBUTED.md): run the same command on every host with ``distributed=true`` (TPU pods,
SLURM, Open MPI are detected; elsewhere add ``--coordinator-address H:P --num-processes N --process-id I``), e.g.::

    gcloud compute tpus tpu-vm ssh my-v5e-64 --zone us-west4-a --worker=all --command \\
      "cd dspark-jax && .venv/bin/dspark train --config qwen3-4b-dspark distributed=true \\
       target.path=/gcs/Qwen3-4B data.train_files=[/gcs/train.jsonl] output_dir=/gcs/runs/4b \\
       optim.micro_batch_size=64 mesh.fsdp=64"
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from dspark_jax import host_memory
from dspark_jax.config import ConfigError
from dspark_jax.distributed import (
    DistributedError,
    add_distributed_args,
    config_from_args,
    initialize,
)
from dspark_jax.train.config import list_presets, load_train_config
from dspark_jax.train.memory import estimate_memory
from dspark_jax.train.target_cache import CacheError
from dspark_jax.train.trainer import Trainer, write_cache_for_config


def _load(args):
    """The run's config, after which this process joins the multi-process run it names (config section, then
    flags), before anything starts the JAX backend."""
    cfg = load_train_config(args.config, args.overrides)
    try:
        joined = initialize(config_from_args(args, cfg.distributed))
    except DistributedError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg.replace(distributed=joined)


def cmd_train(args) -> int:
    try:
        cfg = _load(args)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        n = args.num_devices or jax.device_count()
        try:
            report = estimate_memory(cfg, n, device=args.device)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"[dry-run] {args.config}: {cfg.draft.kind} draft, target {cfg.target.path or cfg.target.arch}, "
              f"micro batch {cfg.optim.micro_batch_size or cfg.optim.global_batch_size}, "
              f"max_length {cfg.data.max_length}")
        print(report.table(args.device))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"mesh": report.mesh_shape, "num_devices": n, "bytes": report.rows,
                           "total": report.total, "params": report.counts}, f, indent=2)
        return 0

    _cpu_step_buffers(cfg, args.cpu_step_buffers)
    try:
        result = Trainer(cfg).run()
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    last = result.history[-1] if result.history else {}
    print(f"[train] done: {result.steps} steps; last loss {last.get('loss', float('nan')):.4f}, "
          f"accept_rate@0 {last.get('accept_rate@0', float('nan')):.3f}; metrics in "
          f"{os.path.join(result.output_dir, 'metrics.jsonl')}")
    return 0


def _cpu_step_buffers(cfg, mode: str) -> None:
    """On CPU, before the backend starts: keep the step's temporary buffer between steps when it pays
    (dspark_jax/host_memory.py); process 0 says what it chose when the CPU trains."""
    if mode not in host_memory.MODES:   # from $DSPARK_CPU_STEP_BUFFERS (argparse checks only the flag)
        raise SystemExit(f"error: --cpu-step-buffers / $DSPARK_CPU_STEP_BUFFERS must be one of "
                         f"{', '.join(host_memory.MODES)}, got {mode!r}")
    if mode == "default" or not host_memory.cpu_trains():
        return
    say = print if not cfg.distributed.process_id else (lambda *a: None)
    temps = None
    if mode == "auto":
        devices = host_memory.local_cpu_devices() * (cfg.distributed.num_processes or 1)
        try:
            temps = estimate_memory(cfg, devices, device="cpu").activations
        except Exception as e:   # best effort: a config the estimate cannot model still trains
            say(f"[train] CPU step buffers left alone (no estimate: {e})")
            return
    apply, why = host_memory.choose(mode, temps)
    status = host_memory.keep_cpu_step_buffers() if apply else "off"
    say(f"[train] CPU step buffers: {status} ({why})")


def cmd_prepare_cache(args) -> int:
    try:
        cfg = _load(args)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.data.cache_dir is not None:
        raise SystemExit("error: data.cache_dir is set: prepare-cache reads the JSONL files and writes --out")

    try:
        manifest = write_cache_for_config(cfg, args.out, batch_size=args.batch_size, overwrite=args.overwrite)
    except (ConfigError, CacheError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() != 0:
        return 0
    print(f"[prepare-cache] {manifest.num_samples} samples in {manifest.num_shards} shard(s) -> {args.out}")
    return 0


def add_train_parsers(sub) -> None:
    presets = ", ".join(list_presets())
    p = sub.add_parser("train", help="train a DSpark / DFlash / Eagle3 draft",
                       description=f"Train a draft. Presets: {presets}. Overrides: dotted key=value (YAML values), "
                                   "e.g. optim.lr=3e-4 mesh.tensor=2 data.train_files=[a.jsonl].",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help=f"a YAML file or a preset name ({presets})")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-device memory table for this config and mesh (no allocation) and exit")
    p.add_argument("--num-devices", type=int, default=None, help="devices to size the dry run for "
                   "(default: the devices present)")
    p.add_argument("--device", default=None, help="chip name for the dry run's fits/does-not-fit line "
                   "(v5e, v5p, v4, v6e, h100, h200, a100, b200)")
    p.add_argument("--json", default=None, help="also write the dry-run table as JSON here")
    p.add_argument("--cpu-step-buffers", default=os.environ.get("DSPARK_CPU_STEP_BUFFERS", "auto"),
                   choices=host_memory.MODES,
                   help="CPU training only: keep the step's temporaries allocated between steps (a synchronous "
                        "CPU client and glibc thresholds: dspark_jax/host_memory.py). auto (default, or "
                        "$DSPARK_CPU_STEP_BUFFERS): when the dry run's activation estimate per device passes "
                        "glibc's 32 MiB adaptive limit")
    add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare-cache", help="write an offline target-feature cache (DeepSpec v2 layout)",
                       description="Run the target over the config's training data and store taps + last hidden "
                                   "states in DeepSpec's version-2 cache layout (manifest.json, samples.idx, shards).")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true")
    add_distributed_args(p)
    p.set_defaults(func=cmd_prepare_cache)


__all__ = ["add_train_parsers", "cmd_train", "cmd_prepare_cache"]
