"""``dspark train --dry-run``: per-device memory of a training run, without allocating anything.

Parameters, frozen arrays and optimizer state are exact: the target and draft are built with
``nnx.eval_shape`` (shapes and dtypes only), the optimizer state with ``jax.eval_shape(optimizer.init)``, and
each array's per-device share follows from its ``logical_axes`` and the run's :class:`LogicalRules` on the
requested mesh shape (the same rule the real run places arrays by; no devices are needed, so a v5e-64 job can
be sized on a laptop).

Activations are an analytic estimate of the peak of one micro-step (stated per term in
:func:`activation_terms`) for the code path the run takes (:func:`kernel_path`: Pallas flash block attention and
the fused vocab loss on TPU / GPU, the XLA reference on CPU) and the draft layers' ``optim.remat`` policy. On CPU
the test ``tests/train/test_memory_estimate.py`` holds it to XLA's own figure for the compiled step
(``compiled.memory_analysis()``) within 15%; on a real TPU / GPU that figure is the ground truth. The report also
gives the step's matmul FLOPs per device (:func:`step_flops`) and the step time they imply at the chip's peak.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.drafts.build import build_draft
from dspark_jax.nn.abstract import abstract_module
from dspark_jax.nn.frozen import Frozen
from dspark_jax.sharding import MESH_AXES, LogicalRules
from dspark_jax.targets.registry import build_target, target_config_from_json
from dspark_jax.train.config import TrainConfig, target_config_for
from dspark_jax.train.schedule import make_optimizer
from dspark_jax.train.trainer import draft_config_for

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


def kernel_path(device: str | None) -> str:
    """Which attention / vocab-loss code a run on ``device`` takes with ``impl="auto"``: ``pallas`` on TPU and
    GPU chips, ``xla`` on CPU (or an unknown / unnamed device: the machine running the dry run)."""
    d = (device or "").lower()
    return "pallas" if d and d != "cpu" and d in DEVICE_MEMORY_GIB else "xla"


def activation_terms(cfg: TrainConfig, t: TargetConfig, draft_cfg, mesh_shape: Mapping[str, int],
                     online: bool = True, path: str = "xla") -> dict[str, int]:
    """Analytic per-device activation bytes of one micro-step at the longest bucket (``data.max_length``).

    ``path``: ``pallas`` (flash block attention and the fused vocab loss: TPU / GPU) or ``xla`` (the reference
    code: CPU). Terms, with ``b`` sequences per device, ``Q = N * slots`` block queries, ``S`` context, ``c``
    compute bytes:

    * draft layer residuals, per layer: the block's hidden-state, norm, projection and MLP activations
      (``b*Q*(6H + (nh + 2 nkv) hd + 3I) * c``) and the context keys / values (``b*S*4 nkv hd * c``). ``optim.remat``
      cuts them: ``dots`` keeps the matmul outputs only, ``layers`` only each layer's input (plus one layer's
      residuals, rebuilt during its backward).
    * attention: ``pallas``: the flash kernel keeps its output and row statistics only; ``xla``: three fp32
      ``[b, nh, Q, S]`` arrays per layer (scores, probabilities and the mask as fp32) --
      measured: XLA:CPU keeps these of every layer whatever ``remat`` says (its scheduler is not memory-aware
      and hoists the recomputation; compiled temp bytes differ by ~3% between the policies), so the XLA path
      ignores ``remat``; ``remat`` is counted on the ``pallas`` path, whose TPU / GPU schedulers honour it.
    * vocab loss over the ``b*N*Bs`` labelled slots: ``pallas``: fp32 row accumulators only; ``xla`` with the
      vocab in one chunk (or ``vocab_chunk: 0``): three fp32 ``[rows, V]`` arrays (the one-pass loss keeps
      ``p_d``, ``p_t`` and builds the logit gradient); ``xla`` chunked: six ``[rows, chunk]`` arrays.
    """
    o = cfg.optim
    micro = o.micro_batch_size or o.global_batch_size
    ways = mesh_shape["data"] * mesh_shape["fsdp"]
    b = max(1, micro // ways)
    tp = mesh_shape["tensor"]
    s = cfg.data.max_length
    dims = target_layer_dims(t)
    a = draft_cfg.arch
    h, nh, nkv, hd = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim   # the draft's layers
    t_bytes = jnp.dtype(cfg.target.dtype).itemsize
    c_bytes = 4 if o.precision == "fp32" else 2
    lt = len(draft_cfg.target_layer_ids)
    remat = getattr(o, "remat", "none")
    terms: dict[str, int] = {}
    # target forward, no gradient: outputs kept + one layer's temporaries (scores fp32, MLP up/gate)
    outputs = b * s * (lt + 1) * h * t_bytes
    heads_t = dims["heads"] // tp or 1
    scores = b * heads_t * s * s * 4 * 2                # the target's causal attention is the XLA reference
    # per-head keys and values as attention reads them (MLA up-projects its latent to these in a prompt pass)
    kv = b * s * heads_t * (dims["qk"] + dims["v"]) * t_bytes if dims["latent"] else 0
    layer_tmp = max(scores, b * s * (dims["inter"] // tp or 1) * 3 * t_bytes) + kv + 4 * b * s * h * t_bytes
    terms["target features (taps + last hidden)"] = outputs
    terms["target forward temporaries (one layer)"] = layer_tmp if online else 0
    nh_l = nh // tp or 1

    # the draft's terms, by family
    def eagle3_terms() -> int:
        """Eagle3 (TTT over every position): -> labelled logit rows."""
        steps = draft_cfg.ttt_length
        per_layer = b * steps * (s * (2 * h * 6 + (nh + 2 * nkv) * hd * 2 + a.intermediate_size * 3) * c_bytes
                                 + nh_l * s * (s + steps) * 4 * 2)
        terms["draft residuals (fwd+bwd)"] = per_layer + b * s * (lt * h + h) * c_bytes
        return b * s * steps

    def block_terms() -> int:
        """DSpark / DFlash (anchored blocks): -> labelled logit rows."""
        q_tok = draft_cfg.num_anchors * draft_cfg.num_block_slots
        inter_l = a.intermediate_size // tp or 1
        full = b * (q_tok * (6 * h + (nh + 2 * nkv) * hd + 3 * inter_l) + s * 4 * nkv * hd) * c_bytes
        dots = b * (q_tok * (2 * h + (nh + 2 * nkv) * hd + 2 * inter_l) + s * 2 * nkv * hd) * c_bytes
        layers = draft_cfg.num_draft_layers
        # XLA:CPU hoists the recomputation of rematerialised layers (see above): it keeps everything
        kept = {"none": full * layers, "dots": dots * layers + (full - dots),
                "layers": b * q_tok * h * c_bytes * layers + full}[remat if path == "pallas" else "none"]
        terms[f"draft layer residuals (remat {remat})"] = kept + b * s * (lt * h + 2 * h) * c_bytes
        if path == "pallas":
            attn = b * nh_l * q_tok * (hd * c_bytes + 8) * (layers if remat != "layers" else 1)
        else:
            attn = 3 * b * nh_l * q_tok * s * 4 * layers
        terms[f"draft attention ({'flash kernel' if path == 'pallas' else 'XLA scores'})"] = attn
        return b * draft_cfg.num_anchors * draft_cfg.block_size

    logit_rows = {"eagle3": eagle3_terms, "block": block_terms}[draft_cfg.family]()
    v = a.vocab_size
    if path == "pallas" and o.vocab_chunk:
        loss = logit_rows * (3 * h + 2 * (draft_cfg.markov_rank or 1)) * 4
        name = "vocab loss (fused kernel accumulators)"
    elif not o.vocab_chunk or o.vocab_chunk >= v:
        loss, name = 3 * logit_rows * v * 4, "vocab loss (whole-vocab fp32 logits)"
    else:
        loss, name = 6 * logit_rows * o.vocab_chunk * 4, "vocab loss (fp32 logit chunks)"
    terms[name] = loss
    return terms


def target_layer_dims(t) -> dict[str, int]:
    """What the dry run needs of a target's layers, for any family it models: ``heads``, the per-head score
    (``qk``) and value (``v``) widths, the MLP width a token goes through (``inter``: of an MoE layer, the chosen
    and shared experts), ``matmul`` (the weights of every matmul one token passes, all layers) and whether the KV
    cache is an MLA ``latent`` that prompt passes up-project."""
    if hasattr(t, "active_matmul_params"):        # DeepSeek-V3 family (MLA + DeepSeekMoE)
        moe = t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts) if t.n_routed_experts else 0
        return dict(heads=t.num_attention_heads, qk=t.qk_head_dim, v=t.v_head_dim,
                    inter=max(t.intermediate_size if t.first_k_dense_replace else 0, moe),
                    matmul=t.active_matmul_params(), latent=1)
    h, nh, nkv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    inter = t.moe_intermediate_size * t.num_experts_per_tok if t.num_experts else t.intermediate_size
    proj = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * inter
    return dict(heads=nh, qk=hd, v=hd, inter=inter, matmul=t.num_hidden_layers * proj, latent=0)


# Peak dense bf16 TFLOP/s per chip (vendor figures), for the dry run's expected step time.
DEVICE_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0, "h200": 989.0,
                      "a100": 312.0, "b200": 2250.0}


def step_flops(cfg: TrainConfig, t: TargetConfig, draft_cfg, online: bool = True, path: str = "xla") -> float:
    """Matmul FLOPs of one micro-step per sequence (forward + backward; the frozen ``lm_head`` gets no weight
    gradient). Attention over the context counts all ``S`` keys on the ``xla`` path and half (masked tiles
    skipped by the flash kernel) on ``pallas``. DSpark / DFlash drafts; Eagle3 counts only the target."""
    s = cfg.data.max_length
    dims = target_layer_dims(t)
    target = 2.0 * dims["matmul"] * s + 2.0 * t.num_hidden_layers * s * s * dims["heads"] * (dims["qk"] + dims["v"])
    flops = target if online else 0.0
    return flops + _DRAFT_STEP_FLOPS[draft_cfg.family](cfg, draft_cfg, s, path)


def _block_draft_step_flops(cfg: TrainConfig, draft_cfg, s: int, path: str) -> float:
    a = draft_cfg.arch
    h, nh, nkv, hd = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
    q = draft_cfg.num_anchors * draft_cfg.num_block_slots
    rows = draft_cfg.num_anchors * draft_cfg.block_size
    lt, r, v = len(draft_cfg.target_layer_ids), draft_cfg.markov_rank, a.vocab_size
    d_proj = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * a.intermediate_size
    ctx = s if path == "xla" else s / 2
    layer = 2.0 * (d_proj * q + 2 * h * nkv * hd * s + 2 * 2 * q * ctx * nh * hd)
    flops = 3.0 * draft_cfg.num_draft_layers * layer + 2 * 2.0 * s * lt * h * h
    flops += 2.0 * rows * v * (3 * h + 3 * r)          # draft + target logits, Markov bias; dh, du, dW2
    return flops


# the draft's matmul FLOPs per sequence, by family (Eagle3's are not modelled: its step counts the target only)
_DRAFT_STEP_FLOPS = {"block": _block_draft_step_flops, "eagle3": lambda cfg, draft_cfg, s, path: 0.0}


@dataclasses.dataclass
class MemoryReport:
    mesh_shape: dict[str, int]
    num_devices: int
    rows: dict[str, int]          # name -> bytes per device
    counts: dict[str, int]        # name -> parameter count (whole model)
    flops_per_device: float = 0.0  # matmul FLOPs of one micro-step on each device (step_flops * sequences)
    path: str = "xla"
    activation_rows: tuple[str, ...] = ()   # the rows that are the step's temporaries (activation_terms)

    @property
    def activations(self) -> int:
        """Bytes per device of the step's temporaries (features, forward temporaries, residuals, loss)."""
        return sum(self.rows[k] for k in self.activation_rows)

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
        peak = DEVICE_PEAK_TFLOPS.get((device or "").lower())
        if peak and self.flops_per_device:
            t = self.flops_per_device / (peak * 1e12)
            lines.append(f"  kernels: {self.path}; {self.flops_per_device / 1e12:.2f} TFLOP per device per micro-step "
                         f"-> {1e3 * t:.0f} ms at the {peak:.0f} TFLOP/s peak, {1e3 * t / 0.4:.0f} ms at 40% MFU")
        for k, n in self.counts.items():
            lines.append(f"  ({k}: {n / 1e6:,.1f}M parameters)")
        return "\n".join(lines)


def estimate_memory(cfg: TrainConfig, num_devices: int, rules: LogicalRules | None = None,
                    device: str | None = None) -> MemoryReport:
    """Per-device bytes of the run described by ``cfg`` on ``num_devices`` devices (nothing is allocated).

    ``rules`` place the target (default :class:`LogicalRules`); the draft follows ``cfg.mesh.draft_sharding``.
    ``device`` (``v5e``, ``h100``, ``cpu``, ...) picks the kernel path that run takes (:func:`kernel_path`)."""
    rules = rules or LogicalRules()
    draft_rules = cfg.mesh.draft_rules()
    shape = mesh_shape_for(cfg, num_devices)
    mesh = _ShapeMesh(shape)
    if cfg.target.path is not None:
        tcfg = target_config_from_json(cfg.target.path)
        if not isinstance(tcfg, TargetConfig) and not hasattr(tcfg, "active_matmul_params"):
            # target_layer_dims models Qwen3 and DeepSeek-V3 layers; Gemma4's differ layer by layer
            raise ConfigError(f"{cfg.target.path}: --dry-run models Qwen3 / Qwen3-MoE / DeepSeek-V3 targets; a "
                              f"{tcfg.model_type} target's memory is not modelled yet")
    else:
        tcfg = target_config_for(cfg.target)
    dcfg = draft_config_for(cfg, tcfg)
    compute = "float32" if cfg.optim.precision == "fp32" else "bfloat16"

    def build(rngs):
        target = build_target(tcfg, dtype=cfg.target.dtype, rngs=rngs)
        draft = build_draft(target, dcfg, dtype=compute, param_dtype="float32")
        for _, var in nnx.iter_graph(draft):  # as the trainer stores them: compute dtype, no master copy
            if isinstance(var, Frozen):
                var.set_value(var.get_value().astype(compute))
        return target, draft

    target, draft = abstract_module(build)
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
    path = kernel_path(device)
    acts = activation_terms(cfg, tcfg, draft.config, shape, online, path)
    rows.update(acts)
    ways = shape["data"] * shape["fsdp"]
    seqs = max(1, micro // ways)
    flops = step_flops(cfg, tcfg, draft.config, online, path) * seqs / max(1, shape["tensor"])
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    counts = {"target": count(nnx.state(target)), "draft trainable": count(params),
              "draft frozen": count(frozen)}
    return MemoryReport(mesh_shape=shape, num_devices=num_devices, rows=rows, counts=counts,
                        flops_per_device=flops, path=path, activation_rows=tuple(acts))


__all__ = ["estimate_memory", "MemoryReport", "activation_terms", "kernel_path", "step_flops", "target_layer_dims",
           "DEVICE_PEAK_TFLOPS", "mesh_shape_for", "DEVICE_MEMORY_GIB"]
