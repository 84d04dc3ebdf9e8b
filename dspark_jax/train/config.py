"""Training-run configuration: frozen dataclasses read from YAML presets with ``key=value`` overrides.

A run is described by one :class:`TrainConfig` with sections ``target``, ``draft``, ``data``, ``optim``, ``mesh``,
``checkpoint`` and ``log`` (see the field docs below and ``configs/*.yaml``). Files are YAML; a file may name a
``base:`` (another file, relative to it, or a preset name) whose values it overrides, so a preset family
shares one definition::

    # configs/qwen3-8b-dspark.yaml
    base: qwen3-4b-dspark
    target: {arch: qwen3-8b}

Overrides on the command line use dotted keys and YAML values: ``optim.lr=3e-4``,
``draft.target_layer_ids=[1,9,17]``, ``target.path=null``. Every value is type-checked against the dataclass
field; a wrong type, an unknown key or a bad value raises :class:`~dspark_jax.config.ConfigError` naming the key
and where it came from (file or command line).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from typing import Any, Mapping, Sequence, Union

import yaml

from dspark_jax.config import ConfigError, RopeConfig, TargetConfig, tiny_qwen3_config
from dspark_jax.distributed import DistributedConfig, DistributedError
from dspark_jax.sharding import DEFAULT_RULES, LogicalRules
from dspark_jax.targets.registry import family_of

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
"""Where the packaged presets live (``dspark_jax/configs``; the repo's ``configs/`` links here)."""

# Public target configs (Qwen3: spec §1.1), so dry runs and presets can size a job without the checkpoint.
KNOWN_TARGETS: dict[str, dict[str, Any]] = {
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
# DeepSeek-V3 (671B; V3.1 and R1 share the architecture): deepseek-ai/DeepSeek-V3's config.json
KNOWN_TARGETS["deepseek-v3"] = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
    max_position_embeddings=163840, rms_norm_eps=1e-6, rope_interleave=True, num_nextn_predict_layers=1,
    rope=RopeConfig(rope_theta=10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=0, eos_token_id=1, dtype="bfloat16")
_QWEN3_COMMON = dict(model_type="qwen3", vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960,
                     rope=RopeConfig(rope_theta=1e6), eos_token_id=151645)


@dataclasses.dataclass(frozen=True)
class TargetSection:
    """The frozen target.

    path: Hugging Face checkpoint directory (config.json + safetensors). None: a random target of ``arch``
      (``tiny`` for CPU runs, or a :data:`KNOWN_TARGETS` name, which only makes sense for ``--dry-run``).
    arch: architecture name used when ``path`` is None (and to size dry runs).
    tiny: overrides of the ``tiny`` architecture's fields (hidden_size, num_hidden_layers, vocab_size, ...).
    dtype: parameter/compute dtype of the target (``bfloat16`` or ``float32``).
    pretrain_steps: with ``path`` None, first fit the random target to the training data for this many
      next-token steps (a trained-from-scratch target, so the draft has something to imitate); the result is
      saved in HF format to ``<output_dir>/target``.
    pretrain_lr, pretrain_batch_size: optimiser settings of that fit.
    seed: init seed of a random target.
    """

    path: str | None = None
    arch: str = "tiny"
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 16
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DraftSection:
    """The draft to train (DeepSpec's field names; spec §1.1 / §5).

    kind: ``dspark`` (Markov + confidence heads), ``dflash`` (no heads, CE only) or ``eagle3``.
    mask_token_id: None = the target's ``vocab_size - 1`` for ``tiny``, 151669 for Qwen3 targets.
    init_from: a DeepSpec draft directory to start from (fine-tuning) instead of a fresh init.
    """

    kind: str = "dspark"
    block_size: int = 7
    num_draft_layers: int = 5
    target_layer_ids: tuple[int, ...] = (1, 9, 17, 25, 33)
    mask_token_id: int | None = None
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    loss_decay_gamma: float | None = None
    ce_loss_alpha: float | None = None
    l1_loss_alpha: float | None = None
    confidence_loss_alpha: float | None = None
    init_from: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training conversations (spec §3.1) or an offline target cache (spec §3.2).

    train_files: DeepSpec JSONL files; ``embedded:tiny`` is the small arithmetic/facts set shipped with the
      package (no download).
    tokenizer: tokenizer directory; None = the target checkpoint's (or, for a random ``tiny`` target, a
      byte-level BPE trained on the training text, saved to ``<output_dir>/target``).
    cache_dir: read target features from this offline cache instead of running the target in the step.
    buckets: padded sequence lengths (None: powers of two from 128 up to max_length).
    packing: pack several conversations into each row of ``max_length`` tokens (DSpark / DFlash only): attention,
      labels and the target's forward stay within a conversation, RoPE positions restart per conversation, and
      the row's ``draft.num_anchors`` anchors are shared out over its conversations. ``optim.global_batch_size``
      then counts packed rows. Off by default.
    """

    train_files: tuple[str, ...] = ()
    tokenizer: str | None = None
    chat_template: str = "qwen"
    max_length: int = 4096
    min_loss_tokens: int = 14
    skip_bad_lines: bool = False
    mask_source: str = "auto"
    cache_dir: str | None = None
    buckets: tuple[int, ...] | None = None
    num_threads: int = 2
    packing: bool = False


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """Optimiser and schedule (spec §3.5).

    global_batch_size: sequences per optimizer update; micro_batch_size: sequences per step call (over all
      devices; None = global). Their ratio is the gradient-accumulation factor.
    epochs: the schedule's length ``T = epochs * floor(N / global_batch_size)`` updates.
    max_steps: stop after this many micro-steps (the schedule is unchanged); None = run all epochs.
    precision: ``bf16`` = draft computes in bf16 with fp32 parameters (the fp32 master copy) and bf16 target;
      ``fp32`` = everything fp32.
    vocab_chunk: reduce the loss over the vocabulary in chunks of this many rows (no [.., V] logits);
      0 = materialise the logits.
    peak_tflops: the device's peak dense TFLOP/s for the MFU estimate (None: a table of known devices).
    remat: what the backward pass recomputes of each DSpark / DFlash draft layer: ``none`` (keep everything),
      ``dots`` (keep the matmul outputs, recompute attention scores and elementwise temporaries) or ``layers``
      (keep only each layer's input). ``--dry-run`` counts it.
    """

    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    epochs: int = 10
    global_batch_size: int = 512
    micro_batch_size: int | None = None
    max_steps: int | None = None
    seed: int = 42
    precision: str = "bf16"
    vocab_chunk: int = 8192
    peak_tflops: float | None = None
    remat: str = "none"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh (``dspark_jax.sharding.make_mesh``); ``fsdp: -1`` takes the devices the others leave.

    draft_sharding: ``sharded`` places the draft's parameters and optimizer state by the same logical-axis rules
      as the target (``embed`` over ``fsdp``, heads/mlp/vocab over ``tensor``); ``replicated`` keeps a full copy
      of the (small) draft on every ``data``/``fsdp`` shard and splits only over ``tensor``/``expert`` -- DeepSpec's
      FSDP ``NO_SHARD`` -- while the target stays sharded (fewer all-gathers per step, more memory).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    draft_sharding: str = "sharded"

    def draft_rules(self) -> LogicalRules:
        """The :class:`LogicalRules` for the draft's parameters and optimizer state."""
        if self.draft_sharding == "replicated":
            return LogicalRules(tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES))
        return LogicalRules()

    def shape(self) -> dict[str, int]:
        out = {"data": self.data, "tensor": self.tensor, "expert": self.expert}
        if self.fsdp != -1:
            out["fsdp"] = self.fsdp
        return out


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints in ``<output_dir>/checkpoints`` every ``every`` micro-steps, keeping ``keep``."""

    every: int = 3000
    keep: int = 3
    async_save: bool = True
    export_draft: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    """``every``: micro-steps per metrics line (JSONL in ``<output_dir>/metrics.jsonl``); ``tensorboard``:
    ``auto`` (if tensorboardX is installed), ``true`` (required) or ``false``."""

    every: int = 10
    progress: bool = True
    tensorboard: str = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``output_dir`` receives checkpoints, metrics, the exported draft and, for a random
    target, the target and tokenizer. ``distributed``: how this process joins a multi-host run
    (:class:`~dspark_jax.distributed.DistributedConfig`; ``distributed=true`` is short for
    ``distributed.enabled=true``, which on TPU pods, SLURM and Open MPI is all it takes)."""

    output_dir: str = "runs/dspark"
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    target: TargetSection = dataclasses.field(default_factory=TargetSection)
    draft: DraftSection = dataclasses.field(default_factory=DraftSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def with_overrides(self, overrides: Sequence[str], where: str = "command line") -> "TrainConfig":
        tree = self.to_dict()
        for item in overrides:
            _apply_override(tree, item, where)
        return from_dict(tree, where)


# ---- checks ------------------------------------------------------------------------------------------------
_CHOICES = {
    ("draft", "kind"): ("dspark", "dflash", "eagle3"),
    ("draft", "markov_head_type"): ("vanilla", "gated", "rnn"),
    ("target", "dtype"): ("bfloat16", "float32"),
    ("optim", "precision"): ("bf16", "fp32"),
    ("data", "mask_source"): ("auto", "span", "template"),
    ("log", "tensorboard"): ("auto", "true", "false"),
    ("mesh", "draft_sharding"): ("sharded", "replicated"),
    ("optim", "remat"): ("none", "dots", "layers"),
}
_POSITIVE = {("optim", "global_batch_size"), ("optim", "epochs"), ("data", "max_length"), ("checkpoint", "every"),
             ("log", "every"), ("draft", "block_size"), ("draft", "num_draft_layers"), ("draft", "num_anchors"),
             ("optim", "micro_batch_size"), ("optim", "max_steps"), ("checkpoint", "keep"),
             ("target", "pretrain_batch_size")}


def validate(cfg: TrainConfig) -> None:
    """Value checks beyond types (types are checked when reading)."""
    for (sec, name), choices in _CHOICES.items():
        v = getattr(getattr(cfg, sec), name)
        if v not in choices:
            raise ConfigError(f"{sec}.{name}={v!r} is not one of {choices}")
    for sec, name in _POSITIVE:
        v = getattr(getattr(cfg, sec), name)
        if v is not None and v < 1:
            raise ConfigError(f"{sec}.{name} must be >= 1, got {v}")
    o = cfg.optim
    mb = o.micro_batch_size or o.global_batch_size
    if o.global_batch_size % mb:
        raise ConfigError(f"optim.micro_batch_size={mb} must divide optim.global_batch_size={o.global_batch_size}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if o.vocab_chunk < 0:
        raise ConfigError(f"optim.vocab_chunk must be >= 0 (0 = materialise logits), got {o.vocab_chunk}")
    for name in ("data", "tensor", "expert"):
        if getattr(cfg.mesh, name) < 1:
            raise ConfigError(f"mesh.{name} must be >= 1, got {getattr(cfg.mesh, name)}")
    if cfg.mesh.fsdp != -1 and cfg.mesh.fsdp < 1:
        raise ConfigError(f"mesh.fsdp must be >= 1 or -1 (all remaining devices), got {cfg.mesh.fsdp}")
    if cfg.target.path is None and cfg.target.arch != "tiny" and cfg.target.arch not in KNOWN_TARGETS:
        raise ConfigError(f"target.arch={cfg.target.arch!r} is not 'tiny' or one of {sorted(KNOWN_TARGETS)}")
    if cfg.target.pretrain_steps < 0:
        raise ConfigError(f"target.pretrain_steps must be >= 0, got {cfg.target.pretrain_steps}")
    if cfg.target.pretrain_steps and cfg.target.path is not None:
        raise ConfigError("target.pretrain_steps needs a random target (target.path: null); a checkpoint is "
                          "used as it is")
    if cfg.data.packing and cfg.draft.kind == "eagle3":
        raise ConfigError("data.packing is for DSpark / DFlash drafts; Eagle3's TTT attention is not segment-aware")
    try:
        cfg.distributed.check()
    except DistributedError as e:
        raise ConfigError(str(e)) from None
    bad_tiny = sorted(set(cfg.target.tiny) - {f.name for f in dataclasses.fields(TargetConfig)})
    if bad_tiny:
        raise ConfigError(f"target.tiny: unknown TargetConfig field(s) {bad_tiny}")


def target_config_for(section: TargetSection):
    """The config of a random target (``section.path`` is None): a :class:`TargetConfig`, or a known target's own
    family config (``deepseek-v3``)."""
    if section.arch == "tiny":
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.05,
                    max_position_embeddings=1024, eos_token_id=None)
        base.update(section.tiny)
        if isinstance(base.get("rope"), Mapping):
            base["rope"] = RopeConfig(**base["rope"])
        return tiny_qwen3_config(**base)
    if section.arch in KNOWN_TARGETS:
        known = KNOWN_TARGETS[section.arch]
        if known.get("model_type", "qwen3") != "qwen3":
            return family_of(known["model_type"]).config_class(**known)
        return TargetConfig(**{**_QWEN3_COMMON, **known})
    raise ConfigError(f"target.arch={section.arch!r} is not 'tiny' or one of {sorted(KNOWN_TARGETS)}")


# ---- reading -----------------------------------------------------------------------------------------------
_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# sections a plain bool may stand for (``distributed: true`` == ``distributed: {enabled: true}``, the old form)
_SECTION_SHORTHANDS = {"distributed": "enabled"}


def _to_plain(x):
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _coerce(value, tp, key: str, where: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} may not be null")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads `true`/`false` as bools; str fields with those choices
            return "true" if value else "false"
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            (elem, *_rest) = typing.get_args(tp)
            return tuple(_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value))
    elif origin in (collections.abc.Mapping, dict) or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:  # pragma: no cover - a field type this reader does not know
        raise TypeError(f"unsupported config field type {tp} for {key}")
    name = getattr(tp, "__name__", str(tp))
    article = "" if origin else ("an " if name[0] in "aeiou" else "a ")
    raise ConfigError(f"{where}: {key} must be {article}{name}"
                      f"{' or null' if optional else ''}, got {type(value).__name__} {value!r}")


def _section_from(cls, raw, name: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; {name} has {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}", where) for k, v in raw.items()})


def from_dict(tree: Mapping[str, Any], where: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a nested dict (types checked, unknown keys rejected)."""
    tree = dict(tree)
    tree.pop("base", None)
    for name, key in _SECTION_SHORTHANDS.items():
        if isinstance(tree.get(name), bool):
            tree[name] = {key: tree[name]}
    unknown = sorted(set(tree) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; expected {sorted(_SECTIONS)}")
    hints = typing.get_type_hints(TrainConfig)
    kw: dict[str, Any] = {}
    for name, value in tree.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kw[name] = _section_from(tp, value, name, where)
        else:
            kw[name] = _coerce(value, tp, name, where)
    try:
        return TrainConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_config_path(name: str | os.PathLike, relative_to: str | None = None) -> str:
    """A config file path from a path or a preset name (``tiny``, ``qwen3-4b-dspark``, ...)."""
    name = os.fspath(name)
    candidates = []
    if relative_to is not None and not os.path.isabs(name):
        candidates.append(os.path.join(relative_to, name))
    candidates.append(name)
    stem = os.path.basename(name)
    if not stem.endswith((".yaml", ".yml")):
        candidates += [name + ".yaml", os.path.join(PRESET_DIR, stem + ".yaml")]
        if relative_to is not None:
            candidates.append(os.path.join(relative_to, stem + ".yaml"))
    else:
        candidates.append(os.path.join(PRESET_DIR, stem))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"config {name!r} not found (tried {candidates}); presets: {list_presets()}")


def list_presets() -> list[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_config_tree(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged YAML tree of ``path`` and its ``base:`` chain (no type checks)."""
    path = resolve_config_path(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(_seen + (path,))}")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    base = tree.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a file or preset name, got {base!r}")
        tree = _deep_merge(read_config_tree(resolve_config_path(base, os.path.dirname(path)), _seen + (path,)),
                           {k: v for k, v in tree.items() if k != "base"})
    return dict(tree)


def _apply_override(tree: dict, item: str, where: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: override {item!r}: value is not valid YAML ({e})") from None
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if node is tree and p in _SECTION_SHORTHANDS and isinstance(nxt, bool):
            nxt = node[p] = {_SECTION_SHORTHANDS[p]: nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: override {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML config (or preset name), applies ``key=value`` overrides, checks every type and value."""
    path = resolve_config_path(path)
    tree = read_config_tree(path)
    from_dict(tree, where=path)  # report file errors against the file before overrides can mask them
    for item in overrides:
        _apply_override(tree, item, "command line")
    return from_dict(tree, where=f"{path} + overrides" if overrides else path)


def dump_config(cfg: TrainConfig) -> str:
    """YAML text of ``cfg`` (what the run saves to ``<output_dir>/config.yaml``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "TargetSection", "DraftSection", "DataSection", "OptimSection", "MeshSection",
           "CheckpointSection", "LogSection", "KNOWN_TARGETS", "PRESET_DIR", "load_train_config", "from_dict",
           "dump_config", "resolve_config_path", "list_presets", "read_config_tree", "target_config_for",
           "validate"]
