"""``dspark train --dry-run``: per-device memory of a training run, without allocating anything.

Parameters, frozen arrays and optimizer state are exact: the target and draft are built with
``nnx.eval_shape`` (shapes and dtypes only), the optimizer state with ``jax.eval_shape(optimizer.init)``, and
each array's per-device share follows from its ``logical_axes`` and the run's :class:`LogicalRules` on the
requested mesh shape (the same rule the real run places arrays by; no devices are needed, so a v5e-64 job can
be sized on a laptop).

Activations are an analytic estimate of the peak of one micro-step with the current XLA code paths (stated per
term in :func:`activation_terms`): the target's forward keeps only its outputs (taps, last hidden) plus one
layer's temporaries; the draft keeps every layer's residuals for the backward pass, including the
``[heads, block tokens, context + block tokens]`` fp32 attention scores of the reference attention. That last
term dominates at DeepSpec's shapes (S=4096, N=512, Bs=7): a fused (flash) attention kernel or rematerialised
draft layers remove most of it. XLA's own figure for a compiled step (``compiled.memory_analysis()``) is the
ground truth on a real device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.train.config import TrainConfig, target_config_for
from dspark_jax.train.mesh import MESH_AXES, LogicalRules

# HBM per chip, GiB (vendor figures), to flag what does not fit.
DEVICE_MEMORY_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141, "a100": 80, "b200": 192,
                     "cpu": None}


@dataclasses.dataclass(frozen=True)
class _ShapeMesh:
    """Only what :meth:`LogicalRules.spec` reads from a mesh: axis sizes."""

    shape: Mapping[str, int]


def mesh_shape_for(cfg: TrainConfig, num_devices: int) -> dict[str, int]:
    """The run's mesh axis sizes on ``num_devices`` devices (``fsdp: -1`` takes what is left)."""
    shape = {a: 1 for a in MESH_AXES}
    shape.update(cfg.mesh.shape())
    others = math.prod(v for k, v in shape.items() if k != "fsdp" or cfg.mesh.fsdp != -1)
    if cfg.mesh.fsdp == -1:
        if num_devices % others:
            raise ConfigError(f"mesh {cfg.mesh.shape()} does not divide {num_devices} devices")
        shape["fsdp"] = num_devices // others
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f"mesh {shape} needs {math.prod(shape.values())} devices, not {num_devices}")
    return shape


def _per_device_bytes(tree, mesh: _ShapeMesh, rules: LogicalRules) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            value, axes = leaf.get_value(), leaf.get_metadata().get("logical_axes")
        else:
            value, axes = leaf, None
        if not hasattr(value, "shape"):
            continue
        shape = list(value.shape)
        spec = rules.spec(mesh, shape, axes) if axes is not None else ()
        for i, part in enumerate(spec):
            if part is None:
                continue
            names = (part,) if isinstance(part, str) else tuple(part)
            shape[i] //= math.prod(mesh.shape[n] for n in names)
        total += int(np.prod(shape)) * jnp.dtype(value.dtype).itemsize
    return total


def activation_terms(cfg: TrainConfig, t: TargetConfig, draft_cfg, mesh_shape: Mapping[str, int],
                     online: bool = True) -> dict[str, int]:
    """Analytic per-device activation bytes of one micro-step at the longest bucket (``data.max_length``)."""
    o = cfg.optim
    micro = o.micro_batch_size or o.global_batch_size
    ways = mesh_shape["data"] * mesh_shape["fsdp"]
    b = max(1, micro // ways)
    tp = mesh_shape["tensor"]
    s = cfg.data.max_length
    h, nh, nkv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    t_bytes = jnp.dtype(cfg.target.dtype).itemsize
    c_bytes = 4 if o.precision == "fp32" else 2
    lt = len(draft_cfg.target_layer_ids)
    terms: dict[str, int] = {}
    # target forward, no gradient: outputs kept + one layer's temporaries (scores fp32, MLP up/gate)
    outputs = b * s * (lt + 1) * h * t_bytes
    inter = t.moe_intermediate_size * t.num_experts_per_tok if t.num_experts else t.intermediate_size
    layer_tmp = max(b * (nh // tp or 1) * s * s * 4 * 2, b * s * (inter // tp or 1) * 3 * t_bytes) + 4 * b * s * h * t_bytes
    terms["target features (taps + last hidden)"] = outputs
    terms["target forward temporaries (one layer)"] = layer_tmp if online else 0
    # draft forward + backward: residuals of every layer
    a = draft_cfg.arch
    if draft_cfg.is_eagle3:
        steps = draft_cfg.ttt_length
        q_tok, kv_tok = s, s * steps
        per_layer = b * steps * (s * (2 * h * 6 + (nh + 2 * nkv) * hd * 2 + a.intermediate_size * 3) * c_bytes
                                 + (nh // tp or 1) * s * (s + steps) * 4 * 2)
        layers, logit_tokens = 1, b * s * steps
    else:
        q_tok = draft_cfg.num_anchors * draft_cfg.block_size
        kv_tok = s + q_tok
        per_layer = b * (q_tok * (h * 6 + (nh + 2 * nkv) * hd * 2 + a.intermediate_size * 3 // tp) * c_bytes
                         + kv_tok * 2 * nkv * hd * c_bytes + (nh // tp or 1) * q_tok * kv_tok * 4 * 2)
        layers, logit_tokens = draft_cfg.num_draft_layers, b * q_tok
    terms["draft residuals (fwd+bwd)"] = per_layer * layers + b * s * (lt * h + h) * c_bytes
    vocab = o.vocab_chunk if o.vocab_chunk else a.vocab_size
    terms["loss logits (draft + target, fp32)"] = logit_tokens * vocab * 4 * 4
    return terms


@dataclasses.dataclass
class MemoryReport:
    mesh_shape: dict[str, int]
    num_devices: int
    rows: dict[str, int]          # name -> bytes per device
    counts: dict[str, int]        # name -> parameter count (whole model)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def table(self, device: str | None = None) -> str:
        gib = 2.0 ** 30
        width = max(len(k) for k in self.rows) + 2
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items() if v > 1) or "1 device"
        lines = [f"per-device memory on {self.num_devices} device(s), mesh ({mesh}):"]
        for k, v in self.rows.items():
            lines.append(f"  {k:<{width}}{v / gib:10.3f} GiB")
        lines.append(f"  {'total':<{width}}{self.total / gib:10.3f} GiB")
        cap = DEVICE_MEMORY_GIB.get((device or "").lower())
        if cap:
            verdict = "fits" if self.total / gib <= 0.9 * cap else "DOES NOT FIT (keep ~10% headroom)"
            lines.append(f"  {device} has {cap} GiB per chip: {verdict}")
        for k, n in self.counts.items():
            lines.append(f"  ({k}: {n / 1e6:,.1f}M parameters)")
        return "\n".join(lines)


def estimate_memory(cfg: TrainConfig, num_devices: int, rules: LogicalRules | None = None) -> MemoryReport:
    """Per-device bytes of the run described by ``cfg`` on ``num_devices`` devices (nothing is allocated).

    ``rules`` place the target (default :class:`LogicalRules`); the draft follows ``cfg.mesh.draft_sharding``."""
    import dspark_jax as dj
    from dspark_jax.config import read_config_json
    from dspark_jax.train.schedule import make_optimizer
    from dspark_jax.train.trainer import draft_config_for

    rules = rules or LogicalRules()
    draft_rules = cfg.mesh.draft_rules()
    shape = mesh_shape_for(cfg, num_devices)
    mesh = _ShapeMesh(shape)
    if cfg.target.path is not None:
        import os

        tcfg = TargetConfig.from_hf_dict(read_config_json(os.path.join(cfg.target.path, "config.json")))
    else:
        tcfg = target_config_for(cfg.target)
    dcfg = draft_config_for(cfg, tcfg)
    compute = "float32" if cfg.optim.precision == "fp32" else "bfloat16"

    def build():
        from dspark_jax.nn.frozen import Frozen

        target = dj.build_target(tcfg, dtype=cfg.target.dtype)
        draft = dj.build_draft(target, dcfg, dtype=compute, param_dtype="float32")
        for _, var in nnx.iter_graph(draft):  # as the trainer stores them: compute dtype, no master copy
            if isinstance(var, Frozen):
                var.set_value(var.get_value().astype(compute))
        return target, draft

    target, draft = nnx.eval_shape(build)
    micro = cfg.optim.micro_batch_size or cfg.optim.global_batch_size
    accum = cfg.optim.global_batch_size // micro
    optimizer = make_optimizer(cfg.optim.lr, 100, grad_accum=accum)
    params = nnx.state(draft, nnx.Param)
    frozen = nnx.state(draft, nnx.Not(nnx.Param))
    opt_state = jax.eval_shape(optimizer.init, params)
    online = cfg.data.cache_dir is None
    rows = {
        "target parameters": _per_device_bytes(nnx.state(target), mesh, rules) if online else 0,
        "draft parameters (fp32 master)": _per_device_bytes(params, mesh, draft_rules),
        "draft frozen embed + lm_head": _per_device_bytes(frozen, mesh, draft_rules),
        f"optimizer state (Adam{' + accumulation' if accum > 1 else ''})": _per_device_bytes(opt_state, mesh,
                                                                                          draft_rules),
        "gradients": _per_device_bytes(params, mesh, draft_rules),
    }
    rows.update(activation_terms(cfg, tcfg, draft.config, shape, online))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    counts = {"target": count(nnx.state(target)), "draft trainable": count(params),
              "draft frozen": count(frozen)}
    return MemoryReport(mesh_shape=shape, num_devices=num_devices, rows=rows, counts=counts)


__all__ = ["estimate_memory", "MemoryReport", "activation_terms", "mesh_shape_for", "DEVICE_MEMORY_GIB"]
