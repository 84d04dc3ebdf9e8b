"""The training loop behind ``dspark train``: config -> target, tokenizer, draft, data, mesh -> steps.

:class:`Trainer` assembles a run from a :class:`~dspark_jax.train.config.TrainConfig` and runs it::

    cfg = load_train_config("tiny", ["optim.max_steps=50"])
    result = Trainer(cfg).run()          # resumes from <output_dir>/checkpoints when a checkpoint is there

What a run writes to ``output_dir``:
  ``config.yaml``       the resolved config;
  ``metrics.jsonl``     one JSON line per ``log.every`` micro-steps (loss terms, accept_rate@k,
                        tau_probabilistic, lr, grad_norm, tokens/s, MFU estimate, epoch, update count);
  ``tensorboard/``      the same scalars as TensorBoard events (when tensorboardX is installed);
  ``checkpoints/<n>/``  orbax checkpoints (train state + data-iterator position), every ``checkpoint.every``;
  ``draft/``            the final draft in DeepSpec's format (``dj.save_draft``; also ``Trainer.export_draft``);
  ``target/``           for a random ``tiny`` target: the (pre-trained) target and its tokenizer, HF format.

Resuming (same config, same output_dir) restores parameters, optimizer state, step, RNG and the data
position, so the continued run is the run that was never stopped. The restore reads into the *current* mesh's
shardings, so a run can move to a different mesh shape or device count. SIGTERM / SIGINT (pre-emption) finish
the current step, write a checkpoint and exit cleanly.

Multi-host (docs/DISTRIBUTED.md): with ``distributed: true`` every host runs the same command
(:mod:`dspark_jax.distributed` joins the run before the backend starts). Each host loads exactly the rows of
the global batch its devices hold, so the global batch, the anchors and every RNG stream -- and so the loss
curve -- are those of a one-host run on the same mesh shape, and checkpoints resume on any host count. Process
0 alone writes shared files (config, metrics, TensorBoard, target, draft); a barrier follows each write another
process reads. Orbax writes checkpoints from all processes into one shared directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dspark_jax import distributed
from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.convert.deepspec import load_draft, save_draft
from dspark_jax.convert.hf import load_target, load_tokenizer, save_target
from dspark_jax.drafts.build import build_draft
from dspark_jax.drafts.config import DSPARK_ARCH, EAGLE3_ARCH, DraftConfig
from dspark_jax.nn.frozen import Frozen
from dspark_jax.sharding import make_mesh, sharding_fn
from dspark_jax.targets.registry import build_target
from dspark_jax.testing import build_chat_tokenizer
from dspark_jax.train.checkpoint import TrainCheckpointManager, sharded_abstract_state
from dspark_jax.train.config import (
    MeshSection,
    TrainConfig,
    dump_config,
    target_config_for,
)
from dspark_jax.train.data import InputPipeline, read_jsonl
from dspark_jax.train.objectives import objective_for
from dspark_jax.train.pretrain import fit_target
from dspark_jax.train.schedule import dspark_lr_schedule, make_optimizer
from dspark_jax.train.step import (
    init_train_state,
    make_train_step,
    process_batch_rows,
    shard_target_state,
    shard_train_state,
    split_draft,
)
from dspark_jax.train.target_cache import TargetCache, write_target_cache

log = logging.getLogger(__name__)

EMBEDDED = {"embedded:tiny": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                          "tiny_conversations.jsonl")}
"""Data files shipped with the package (no download)."""

# Peak dense bf16 TFLOP/s per chip for the MFU estimate (vendor figures; override with optim.peak_tflops).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
               "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
               "NVIDIA B200": 2250.0}


def write_cache_for_config(cfg, directory: str, *, batch_size: int = 16, hidden_dtype: str = "bfloat16",
                           overwrite: bool = False, progress: bool = True, compiler_options: dict | None = None,
                           echo: Callable[[str], None] | None = None):
    """Runs ``cfg``'s target over ``cfg``'s training data (parsed exactly as training parses it) and writes the
    offline cache for ``cfg.draft.target_layer_ids`` to ``directory``: what ``dspark prepare-cache`` does. On
    several processes each writes the batches dealt to it and process 0 merges them into one cache.
    ``echo``: the trainer's input messages (default: its own). Returns the
    :class:`~dspark_jax.train.target_cache.CacheManifest`."""
    distributed.initialize(cfg.distributed)  # before jax.process_count() starts the backend
    devices = None
    if jax.process_count() > 1:
        # data-parallel over processes: each holds a whole target on its own devices and writes a part of the
        # cache (so the target must fit one host's devices; fsdp over them)
        cfg, devices = cfg.replace(mesh=MeshSection()), jax.local_devices()
    inputs = Trainer(cfg, inputs_only=True, compiler_options=compiler_options, echo=echo, devices=devices)
    d = cfg.data
    return write_target_cache(
        directory, inputs.samples, inputs.target, target_layer_ids=tuple(cfg.draft.target_layer_ids),
        batch_size=batch_size, target_model_name_or_path=cfg.target.path or "", progress=progress,
        compiler_options=compiler_options, data_paths=tuple(resolve_data_files(d.train_files)),
        chat_template=d.chat_template, max_length=d.max_length, min_loss_tokens=d.min_loss_tokens,
        hidden_dtype=hidden_dtype, overwrite=overwrite, process_index=jax.process_index(),
        process_count=jax.process_count())


def resolve_data_files(files) -> list[str]:
    out = []
    for f in files:
        out.append(EMBEDDED.get(f, f))
    return out


def _peak_tflops(cfg: TrainConfig) -> float | None:
    if cfg.optim.peak_tflops:
        return cfg.optim.peak_tflops
    kind = jax.devices()[0].device_kind
    for name, tf in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tf
    return None


def draft_config_for(cfg: TrainConfig, target_cfg: TargetConfig):
    """The :class:`~dspark_jax.drafts.config.DraftConfig` of the run's draft section (unbound)."""
    d = cfg.draft
    dtype = "float32" if cfg.optim.precision == "fp32" else "bfloat16"
    common = dict(target_layer_ids=tuple(d.target_layer_ids), num_draft_layers=d.num_draft_layers, dtype=dtype,
                  target_model_name_or_path=cfg.target.path or f"random:{cfg.target.arch}")
    if d.kind == "eagle3":
        return DraftConfig(architecture=EAGLE3_ARCH, ttt_length=d.ttt_length, step_loss_decay=d.step_loss_decay,
                           markov_rank=0, enable_confidence_head=False, **common)
    mask_id = d.mask_token_id
    if mask_id is None:
        mask_id = getattr(target_cfg, "default_mask_token_id", None)
    if mask_id is None:
        mask_id = 151669 if target_cfg.vocab_size == 151936 else target_cfg.vocab_size - 1
    dflash = d.kind == "dflash"
    return DraftConfig(architecture=DSPARK_ARCH, block_size=d.block_size, mask_token_id=mask_id,
                       num_anchors=d.num_anchors, markov_rank=0 if dflash else d.markov_rank,
                       markov_head_type=d.markov_head_type,
                       enable_confidence_head=False if dflash else d.enable_confidence_head,
                       confidence_head_with_markov=d.confidence_head_with_markov,
                       loss_decay_gamma=d.loss_decay_gamma, ce_loss_alpha=d.ce_loss_alpha,
                       l1_loss_alpha=d.l1_loss_alpha, confidence_loss_alpha=d.confidence_loss_alpha, **common)


def model_flops_per_token(target_cfg: TargetConfig, draft, online: bool) -> Callable[[float, float], float]:
    """``(context_tokens, block_tokens) -> FLOPs`` of one micro-step (matmul FLOPs, attention scores excluded):
    the target forward ``2 * P_target`` per context token (when online) and the draft's forward + backward
    ``6 * P_draft_trainable`` per block token (DSpark: ``K * Bs`` block tokens per sequence; Eagle3: TTT steps)."""
    t = target_cfg
    if hasattr(t, "active_matmul_params"):     # families whose layers the Qwen3 formula below does not describe
        p_target = t.active_matmul_params()
    else:
        p_target = t.num_hidden_layers * _qwen3_matmul_params_per_layer(t)
    p_draft = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(draft, nnx.Param)))

    def flops(context_tokens: float, block_tokens: float) -> float:
        return (2.0 * p_target * context_tokens if online else 0.0) + 6.0 * p_draft * block_tokens

    return flops


def _qwen3_matmul_params_per_layer(t) -> int:
    per_layer = (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                 + t.num_attention_heads * t.head_dim * t.hidden_size)
    if t.num_experts:
        per_layer += 3 * t.hidden_size * t.moe_intermediate_size * t.num_experts_per_tok
    else:
        per_layer += 3 * t.hidden_size * t.intermediate_size
    return per_layer


@dataclasses.dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns. ``history``: every logged metrics line (dicts, as in metrics.jsonl)."""

    state: Any
    steps: int
    history: list[dict]
    output_dir: str
    draft_dir: str | None
    stopped_early: bool = False


class Trainer:
    """Builds everything a :class:`TrainConfig` describes. Attributes after construction: ``mesh``, ``target``,
    ``tokenizer``, ``draft`` (initial weights), ``samples``, ``pipeline``, ``optimizer``, ``step_fn``,
    ``total_updates``, ``grad_accum``.

    Args:
      cfg: the run.
      devices: devices for the mesh (default all).
      echo: where human-readable lines go (default ``print`` on process 0).
      compiler_options: XLA options for the jitted steps (tests use fast-compile options on CPU).
      inputs_only: stop after the target, tokenizer and samples (what ``dspark prepare-cache`` needs).
    """

    def __init__(self, cfg: TrainConfig, *, devices=None, echo: Callable[[str], None] | None = None,
                 compiler_options: dict | None = None, inputs_only: bool = False):
        self.compiler_options = compiler_options
        distributed.initialize(cfg.distributed)  # no-op when the CLI already did (or when not distributed)
        self.cfg = cfg
        self.is_main = distributed.is_main_process()
        self.echo = echo or (print if self.is_main else (lambda *_: None))
        self.out_dir = os.path.abspath(cfg.output_dir)
        os.makedirs(self.out_dir, exist_ok=True)

        try:
            self.mesh = make_mesh(cfg.mesh.shape(), devices=devices)
        except ValueError as e:
            raise ConfigError(f"mesh {cfg.mesh.shape()}: {e}") from None
        self._build_target()
        self._build_tokenizer_and_samples()
        self._maybe_pretrain_target()
        if inputs_only:
            return
        self._build_draft()
        self._build_pipeline_and_step()

    # ---- assembly ---------------------------------------------------------------------------------------
    def _build_target(self):
        t = self.cfg.target
        dtype = "float32" if self.cfg.optim.precision == "fp32" and t.dtype == "float32" else t.dtype
        if t.path is not None:
            self.echo(f"[train] loading target {t.path} ({dtype}) onto mesh {dict(self.mesh.shape)}")
            self.target = load_target(t.path, dtype=dtype, sharding=sharding_fn(self.mesh))
            self.random_target = False
        else:
            if t.arch != "tiny":
                raise ConfigError(f"target.path is null and target.arch={t.arch!r}: a random {t.arch} target is only "
                                  "useful for --dry-run; set target.path to the checkpoint directory")
            tcfg = target_config_for(t)
            self.echo(f"[train] random {t.arch} target: H={tcfg.hidden_size}, layers={tcfg.num_hidden_layers}, "
                      f"V={tcfg.vocab_size} ({dtype})")
            self.target = build_target(tcfg, dtype=dtype, seed=t.seed)
            self.random_target = True
        self.target_cfg = self.target.config

    def _build_tokenizer_and_samples(self):
        d = self.cfg.data
        self.cache = None
        if d.cache_dir is not None:
            self.cache = TargetCache(d.cache_dir)
            self.cache.check_compatible(target_layer_ids=tuple(self.cfg.draft.target_layer_ids),
                                        hidden_size=self.target_cfg.hidden_size,
                                        target_model_name_or_path=self.cfg.target.path)
            self.samples = self.cache
            self.lengths = np.asarray(self.cache.lengths)
            self.tokenizer = None
            self.echo(f"[train] offline target cache {d.cache_dir}: {len(self.cache)} samples")
            return
        files = resolve_data_files(d.train_files)
        if not files:
            raise ConfigError("data.train_files is empty: give JSONL files (data.train_files=[a.jsonl]) or "
                              "data.cache_dir")
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"data.train_files: {f} does not exist")
        self.tokenizer = self._load_tokenizer(files)
        self.samples, stats = read_jsonl(files, self.tokenizer, d.chat_template, d.max_length,
                                         min_loss_tokens=d.min_loss_tokens, skip_bad_lines=d.skip_bad_lines,
                                         mask_source=d.mask_source)
        self.read_stats = stats
        self.lengths = np.asarray([len(s["input_ids"]) for s in self.samples], np.int64)
        msg = (f"[train] {len(files)} file(s): {stats.read} lines, kept {stats.kept}, dropped {stats.dropped_short} "
               f"with < {d.min_loss_tokens} loss tokens, {stats.dropped_status} failed generations, "
               f"{stats.truncated} truncated to {d.max_length}")
        if stats.bad:
            msg += f", {stats.bad} malformed (written to {stats.rejects_path})"
        self.echo(msg)
        if not self.samples:
            raise ConfigError(f"no training samples left in {files} after filtering")

    def _load_tokenizer(self, files):
        d, t = self.cfg.data, self.cfg.target
        if d.tokenizer is not None:
            return load_tokenizer(d.tokenizer)
        if t.path is not None:
            tok = self.target.tokenizer
            if tok is None:
                raise ConfigError(f"target {t.path} has no tokenizer files: set data.tokenizer")
            return tok
        # random tiny target: a byte-level BPE trained on the conversations' text (deterministic)

        corpus = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            rec = json.loads(line)
                            corpus += [str(m.get("content", "")) for m in rec.get("conversations", [])]
                        except (json.JSONDecodeError, AttributeError):
                            continue  # read_jsonl reports malformed lines with their location
        tok = build_chat_tokenizer(corpus, self.target_cfg.vocab_size)
        self.echo(f"[train] trained a {len(tok)}-entry BPE tokenizer on the training text")
        return tok

    def _maybe_pretrain_target(self):
        t = self.cfg.target
        if not self.random_target:
            return

        target_dir = os.path.join(self.out_dir, "target")
        done_marker = os.path.join(target_dir, "pretrain.json")
        # process 0's view decides, so no host starts a second fit while another reuses the saved target
        if t.pretrain_steps and bool(distributed.broadcast_from_main(np.asarray(os.path.isfile(done_marker)))):
            # a resumed run: the same pre-trained target, not a second fit
            self.target = load_target(target_dir, dtype=self.target.dtype)
            self.echo(f"[train] reusing the pre-trained target in {target_dir}")
            return
        if t.pretrain_steps:
            losses = fit_target(self.target, self.samples, steps=t.pretrain_steps, lr=t.pretrain_lr,
                                batch_size=t.pretrain_batch_size, max_length=self.cfg.data.max_length,
                                buckets=self.cfg.data.buckets, seed=t.seed, progress=self.cfg.log.progress,
                                log=self.echo, compiler_options=self.compiler_options)
        else:
            losses = []
        if self.is_main:
            save_target(self.target, target_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(target_dir)
            with open(done_marker, "w") as f:
                json.dump({"steps": t.pretrain_steps, "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None}, f)
            self.echo(f"[train] target{' (pre-trained)' if losses else ''} saved to {target_dir}")
        distributed.barrier("dspark_jax.train.target_saved")  # the others read what process 0 just wrote
        if t.pretrain_steps:  # continue from exactly what was saved (a resumed run reloads it)
            self.target = load_target(target_dir, dtype=self.target.dtype)

    def _build_draft(self):

        cfg = self.cfg
        compute = "float32" if cfg.optim.precision == "fp32" else "bfloat16"
        if cfg.draft.init_from is not None:
            self.draft = load_draft(cfg.draft.init_from, dtype="float32")
            self.draft.config.bind(self.target_cfg)
            self.echo(f"[train] draft initialised from {cfg.draft.init_from}")
        else:
            dcfg = draft_config_for(cfg, self.target_cfg)
            self.draft = build_draft(self.target, dcfg, seed=cfg.draft.seed, dtype=compute, param_dtype="float32")
        # frozen embed / lm_head copies of the target: never updated, so no fp32 master; keep them in the compute
        # dtype (half the memory of the largest draft arrays in bf16 runs)

        for _, var in nnx.iter_graph(self.draft):
            if isinstance(var, Frozen) and var.get_value().dtype != jnp.dtype(compute):
                var.set_value(var.get_value().astype(compute))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.draft, nnx.Param)))
        self.echo(f"[train] {cfg.draft.kind} draft: {n / 1e6:.2f}M trainable parameters, compute {compute}, "
                  f"fp32 master weights")

    def _build_pipeline_and_step(self):
        cfg, o = self.cfg, self.cfg.optim
        micro = o.micro_batch_size or o.global_batch_size
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if micro % ways:
            raise ConfigError(f"optim.micro_batch_size={micro} is not divisible by the {ways} data-parallel ways of "
                              f"mesh {dict(self.mesh.shape)} (data x fsdp)")
        if len(self.samples) < o.global_batch_size:
            raise ConfigError(f"{len(self.samples)} samples cannot fill one global batch of {o.global_batch_size} "
                              "(lower optim.global_batch_size)")
        # each process loads the rows its devices hold: the global batch is the one-process batch
        try:
            self.pipeline = InputPipeline(
                self.samples, global_batch_size=o.global_batch_size, micro_batch_size=micro,
                max_length=cfg.data.max_length, buckets=cfg.data.buckets, seed=o.seed, num_epochs=o.epochs,
                lengths=self.lengths, row_positions=process_batch_rows(self.mesh, micro),
                num_threads=cfg.data.num_threads, packing=cfg.data.packing)
        except ValueError as e:
            if cfg.data.packing and "cannot fill" in str(e):    # fewer packed rows than one global batch
                raise ConfigError(f"data.packing: {e} packed rows (lower optim.global_batch_size)") from None
            raise
        rows = len(self.pipeline.samples)
        if cfg.data.packing:
            self.echo(f"[train] packing: {len(self.samples)} conversations into {rows} rows of "
                      f"{cfg.data.max_length} tokens (padding {self.pipeline.padding_fraction():.1%} of the first "
                      "epoch)")
        self.grad_accum = o.global_batch_size // micro
        self.total_updates = o.epochs * (rows // o.global_batch_size)
        self.total_steps = self.total_updates * self.grad_accum
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.schedule = dspark_lr_schedule(o.lr, self.total_updates, o.warmup_ratio)
        self.optimizer = make_optimizer(o.lr, self.total_updates, o.warmup_ratio, weight_decay=o.weight_decay,
                                        clip=o.grad_clip, grad_accum=self.grad_accum)
        online = self.cache is None
        self.draft_rules = cfg.mesh.draft_rules()
        self.step_fn = make_train_step(self.target if online else None, self.draft, self.optimizer,
                                       vocab_chunk=o.vocab_chunk or None, mesh=self.mesh, rules=self.draft_rules,
                                       lr_schedule=self.schedule, remat=o.remat,
                                       compiler_options=self.compiler_options)
        self.target_state = shard_target_state(nnx.split(self.target)[1], self.mesh) if online else None
        self.flops = model_flops_per_token(self.target_cfg, self.draft, online)

    # ---- state ----------------------------------------------------------------------------------------
    def initial_state(self):
        return shard_train_state(init_train_state(self.draft, self.optimizer, seed=self.cfg.optim.seed), self.mesh,
                                 self.draft_rules)

    def checkpoint_manager(self):
        c = self.cfg.checkpoint
        return TrainCheckpointManager(os.path.join(self.out_dir, "checkpoints"), max_to_keep=c.keep,
                                      save_every=c.every, async_save=c.async_save)

    def export_draft(self, state, path: str | None = None) -> str:
        """Writes the draft with ``state``'s weights in DeepSpec's format (default ``<output_dir>/draft``)."""
        graphdef, _, _ = split_draft(self.draft)
        # every process takes part in gathering the shards; only process 0 writes
        draft = nnx.merge(graphdef, _to_host(state.params), _to_host(state.frozen))
        path = path or os.path.join(self.out_dir, "draft")
        if self.is_main:
            save_draft(draft, path)
        distributed.barrier("dspark_jax.train.draft_exported")
        return path

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
        ckpt = self.checkpoint_manager()
        state, it = self.initial_state(), self.pipeline.iterator()
        start = 0
        if ckpt.latest_step() is not None:
            state, extra = ckpt.restore(sharded_abstract_state(self.draft, self.optimizer, self.mesh,
                                                               self.draft_rules))
            try:
                it.set_state(extra["data"])
            except (KeyError, ValueError) as e:
                raise ConfigError(f"the checkpoint in {ckpt.directory} was written with a different data set-up "
                                  f"({e}); use a new output_dir or the original config") from None
            start = int(jax.device_get(state.step))
            self.echo(f"[train] resumed from step {start} ({ckpt.directory})")
        writer = _MetricsWriter(self.out_dir, cfg.log.tensorboard, enabled=self.is_main, truncate_after=start)
        stop = _StopFlag()
        bar = None
        if cfg.log.progress and self.is_main:
            bar = tqdm(total=self.total_steps, initial=min(start, self.total_steps), desc=f"train {cfg.draft.kind}",
                       unit="step", dynamic_ncols=True)
        self.echo(f"[train] {self.total_steps} micro-steps ({self.total_updates} updates x {self.grad_accum} "
                  f"accumulation), {len(self.pipeline.samples)} {'rows' if cfg.data.packing else 'samples'}, "
                  f"{self.pipeline.steps_per_epoch} steps/epoch, "
                  f"mesh {dict(self.mesh.shape)}")
        peak = _peak_tflops(cfg)
        n_dev = self.mesh.devices.size
        pending: list[tuple[int, Any, float]] = []  # (step, device metrics, context tokens)
        t_last = time.perf_counter()
        step = start
        stopped = False
        objective = objective_for(self.draft.config)
        try:
            with stop:
                while step < self.total_steps:
                    batch = next(it)
                    state, metrics = self.step_fn(state, self.target_state, batch)
                    step += 1
                    pending.append((step, metrics, float(self.pipeline.global_tokens(step - 1))))
                    stop_now = stop.agreed(step, cfg.log.every)
                    if step % cfg.log.every == 0 or step == self.total_steps or stop_now:
                        # one host sync per log interval, not per step
                        host = jax.device_get([m for _, m, _ in pending])
                        now = time.perf_counter()
                        dt = max(now - t_last, 1e-9)
                        tokens = flop_sum = 0.0
                        lines = []
                        for (s, _, ctx), m in zip(pending, host):
                            line = {"step": s, "update": s // self.grad_accum,
                                    "epoch": (s - 1) // self.pipeline.steps_per_epoch,
                                    **{k: float(v) for k, v in m.items()}}
                            rows = self.pipeline.sampler.micro_batch_size
                            block_tokens = objective.trained_tokens(self.draft.config, ctx,
                                                                    line.get("anchors_per_seq", 0.0), rows)
                            tokens += ctx
                            flop_sum += self.flops(ctx, block_tokens)
                            lines.append(line)
                        lines[-1]["tokens_per_s"] = tokens / dt
                        lines[-1]["seconds_per_step"] = dt / len(pending)
                        if peak:
                            lines[-1]["mfu"] = flop_sum / dt / (peak * 1e12 * n_dev)
                        writer.write(lines)
                        if bar is not None:
                            bar.set_postfix(loss=f"{lines[-1]['loss']:.4f}", tok_s=f"{lines[-1]['tokens_per_s']:.0f}")
                        pending, t_last = [], now
                    if bar is not None:
                        bar.update(1)
                    ckpt.save(state, {"data": it.get_state(), "epoch": it.epoch()}, force=stop_now)
                    if stop_now:
                        self.echo(f"[train] {stop.signal_name}: checkpoint written at step {step}; exiting")
                        stopped = True
                        break
                if not stopped and ckpt.latest_step() != step:
                    ckpt.save(state, {"data": it.get_state(), "epoch": it.epoch()}, force=True)
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()
        draft_dir = None
        if cfg.checkpoint.export_draft and not stopped:
            draft_dir = self.export_draft(state)
            self.echo(f"[train] draft exported to {draft_dir} (DeepSpec format)")
        return TrainResult(state=state, steps=step, history=writer.history, output_dir=self.out_dir,
                           draft_dir=draft_dir, stopped_early=stopped)


def _to_host(tree):
    """``tree``'s arrays as numpy, whole (gathered from every process when sharded across hosts)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)):
        return jax.device_get(tree)

    return multihost_utils.process_allgather(tree, tiled=True)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (checkpoint, then exit).

    With several processes the signal reaches each at a different step (or only some of them), but the
    checkpoint and the exit must happen at the same step everywhere: there the flag is pooled (any process
    stops all) every ``every`` steps, one small all-gather per log interval."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old = {}

    def _handle(self, signum, _frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, step: int, every: int) -> bool:
        """Whether to stop after ``step`` -- the same answer on every process."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        if np.any(flags) and not self.requested:
            self.signal_name = f"a stop signal to process {int(np.argmax(flags))}"
        return bool(np.any(flags))

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the loop just runs
            self._old = {}
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _MetricsWriter:
    """metrics.jsonl (+ TensorBoard). On resume, lines past the restored step are dropped first so the file
    holds one line per step of the surviving history."""

    def __init__(self, out_dir: str, tensorboard: str, *, enabled: bool, truncate_after: int):
        self.enabled = enabled
        self.history: list[dict] = []
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by a crash: everything after it is gone anyway
                    if rec.get("step", 0) <= truncate_after:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._file = open(self.path, "a")
        if tensorboard != "false":
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                if tensorboard == "true":
                    raise ConfigError("log.tensorboard=true needs tensorboardX (pip install "
                                      "'dspark_jax[tensorboard]')") from None

    def write(self, lines: list[dict]) -> None:
        self.history.extend(lines)
        if not self.enabled:
            return
        for line in lines:
            self._file.write(json.dumps(line) + "\n")
            if self._tb is not None:
                for k, v in line.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self._tb.add_scalar(f"train/{k}", v, line["step"])
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()


__all__ = ["Trainer", "TrainResult", "draft_config_for", "resolve_data_files", "EMBEDDED", "PEAK_TFLOPS"]
