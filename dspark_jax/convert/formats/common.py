"""What every draft format shares: the read-back record (:class:`DraftCheckpoint`), lazy tensors, the format
interface (:class:`DraftFormat`), and the helpers readers and writers of several formats use.

Every format is read into the same draft modules through DeepSpec's tensor names: a reader turns a directory into
a :class:`DraftCheckpoint` (a canonical :class:`DraftConfig` plus a map from DeepSpec key to a lazy tensor), and a
writer turns a draft back into the format's ``config.json`` and tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NoReturn

import jax.numpy as jnp
import numpy as np

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.convert.families import algorithm_of, draft_to_torch_tensors
from dspark_jax.convert.keymap import dtype_name
from dspark_jax.convert.safetensors_io import CheckpointError, save_shards
from dspark_jax.drafts import config as dcfg
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.temperatures import save_temperatures

FORMATS = ("deepspec", "specforge", "speculators", "zlab")
FORMAT_LABELS = {"deepspec": "DeepSpec", "specforge": "SpecForge", "speculators": "vLLM speculators",
                 "zlab": "z-lab / SpecForge DFlash"}
DEFAULT_NUM_ANCHORS = 512           # a DeepSpec training setting no other format stores
DEFAULT_EAGLE3_TOKENS = 7           # Eagle3 chain drafts per round where a format does not say (DeepSpec ttt_length)
SHARED = ("embed_tokens.weight", "lm_head.weight")   # the target's tensors some formats leave out
# keys a format's config carries next to the backbone's; anything else is target noise kept verbatim
MARKOV_KEYS = ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov")
# Qwen3-only keys TargetConfig.to_hf_dict writes, left out of a Llama (Eagle3) backbone config
_QWEN3_ONLY = ("layer_types",)


class FormatError(ConfigError):
    """A checkpoint or a conversion that a format cannot represent; the message says why and what to do."""


# ---- lazy tensors ------------------------------------------------------------------------------------------

class Lazy:
    """A tensor known by shape, read on demand (``read_state`` handles)."""

    def __init__(self, shape: tuple, read: Callable[[], np.ndarray], source: str):
        self.shape, self._read, self.source = tuple(shape), read, source

    def read(self) -> np.ndarray:
        arr = self._read()
        if tuple(arr.shape) != self.shape:   # the shape was promised before reading (a target's file may lie)
            raise CheckpointError(f"{self.source}: has shape {tuple(arr.shape)}, expected {self.shape}")
        return arr


def handle_lazy(h) -> Lazy:
    return Lazy(h.shape, h.read, f"{os.path.basename(h.path)}:{h.key}")


def file_listing(raw: dict) -> dict:
    """file key -> (shape, dtype) as stored."""
    out = {}
    for k, h in raw.items():
        sl = h._handle.get_slice(h.key)
        out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return out


def scatter(lazy: Lazy, sel: tuple[int, ...], v: int) -> Lazy:
    """A ``[Vd, k]`` draft-vocab tensor as ``[V, k]`` (zero rows outside ``sel``; proposals mask them anyway)."""
    def read():
        small = lazy.read()
        full = np.zeros((v,) + small.shape[1:], small.dtype)
        full[np.asarray(sel)] = small
        return full
    return Lazy((v,) + lazy.shape[1:], read, lazy.source)


# ---- the read-back record ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DraftCheckpoint:
    """A draft directory as read: what ``dspark inspect`` prints and what the loader consumes.

    ``config``: canonical (output layer ids, drafted tokens per block, ``draft_vocab`` for pruned vocabularies);
    ``tensors``: DeepSpec key -> lazy tensor in DeepSpec's full-vocab layout; ``shared``: DeepSpec keys the file
    leaves to the target; ``file_tensors``: file key -> (shape, dtype) as stored; ``layer_field``/``file_layer_ids``/
    ``layer_convention``: where and how the file writes the tapped layers.
    """

    path: str
    format: str
    algorithm: str
    config: DraftConfig
    tensors: dict
    shared: tuple[str, ...]
    file_tensors: dict
    layer_field: str
    file_layer_ids: tuple[int, ...]
    layer_convention: str
    verifier: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{FORMAT_LABELS[self.format]} {self.algorithm}"


# ---- the format interface ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """``export_draft``'s settings a writer may use (see its docstring)."""

    dtype: Any = None
    max_shard_bytes: int = 50 * 2**30
    verifier: str | None = None
    verifier_architectures: tuple = ("Qwen3ForCausalLM",)
    store_embedding: bool = False


@dataclasses.dataclass(frozen=True)
class DraftFormat:
    """One checkpoint layout, detect -> read -> write.

    ``detect(d, where)``: whether ``config.json`` (``d``) is this format (may raise a FormatError for a near
    miss); ``read(path, d, where, raw, target)``: ``raw`` (file key -> tensor handle) -> :class:`DraftCheckpoint`;
    ``plan(cfg, pruned, allow_nonstandard)``: the algorithm the format would hold ``cfg`` as, or a FormatError;
    ``prunes(cfg)``: whether it can write ``cfg`` with a pruned vocabulary (d2t/t2d);
    ``write(draft, path, alg, keep, options)``: writes the directory (``keep``: the pruned vocabulary's target
    ids, or None) -> path.
    """

    name: str
    detect: Callable[[Mapping[str, Any], str], bool]
    read: Callable[..., DraftCheckpoint]
    plan: Callable[[DraftConfig, bool, bool], str]
    prunes: Callable[[DraftConfig], bool]
    write: Callable[..., str]


def refuse(fmt: str, why: str) -> NoReturn:
    raise FormatError(f"cannot write this draft as {FORMAT_LABELS[fmt]}: {why}")


# ---- reading helpers ---------------------------------------------------------------------------------------

def arch_config(d: Mapping[str, Any], where: str, drop: set,
                model_types: tuple[str, ...] = ("qwen3",)) -> tuple[TargetConfig, str]:
    """The draft backbone's Qwen3 fields -> (TargetConfig, extra_json of unknown keys kept verbatim).
    ``model_types``: what the caller accepts ("llama" only for Eagle3: a Llama Eagle3 layer)."""
    body = {k: v for k, v in d.items() if k not in drop}
    mt = body.get("model_type", model_types[0])
    if mt not in model_types:
        raise FormatError(f"{where}: the draft backbone has model_type={mt!r}; only "
                          f"{' / '.join(model_types)} draft layers exist here for this algorithm")
    for lt in body.get("layer_types") or ():
        if lt != "full_attention":
            raise FormatError(f"{where}: layer_types holds {lt!r}; a windowed (causal-in-block) draft layer has no "
                              "equivalent here (every draft layer attends to the whole block)")
    body["model_type"] = "qwen3"
    arch = TargetConfig.from_hf_dict(body, where=where)
    known = dcfg._ARCH_KEYS | set(dcfg._DSPARK_KEYS) | set(dcfg._EAGLE3_KEYS) | {"sample_from_anchor", "auto_map"}
    extra = {k: v for k, v in body.items() if k not in known}
    return arch, json.dumps(extra, sort_keys=True)


def make_config(where: str, **kw) -> DraftConfig:
    try:
        return DraftConfig(**kw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None


def ids_field(value, field: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in value):
        raise ConfigError(f"{where}: {field} must be a non-empty list of integers, got {value!r}")
    return tuple(value)


def bool_field(d: Mapping, key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def check_tensors(ck_where: str, cfg: DraftConfig, raw: dict, layer_field: str, file_ids: tuple[int, ...],
                  vocab_rows: dict[str, int]) -> None:
    """The silent failures, named by field: tap count x hidden vs fc's input, vocab rows vs the config."""
    h = cfg.arch.hidden_size
    fc = raw.get("fc.weight")
    if fc is not None:
        width = fc.shape[1] if len(fc.shape) == 2 else None
        if width != cfg.num_taps * h:
            taps = (f"{width // h} taps x hidden_size {h}" if width and width % h == 0
                    else f"not a multiple of hidden_size {h}")
            raise CheckpointError(
                f"{ck_where}: fc.weight has shape {fc.shape} but the model expects {(h, cfg.num_taps * h)}: it takes "
                f"{width} input features ({taps}), while {layer_field}={list(file_ids)} lists "
                f"{cfg.num_taps} tapped layers")
    for key, rows in vocab_rows.items():
        t = raw.get(key)
        if t is not None and t.shape[0] != rows:
            raise CheckpointError(f"{ck_where}: {key} has {t.shape[0]} rows but the config's vocabulary gives "
                                  f"{rows}")


def read_vocab_tables(where: str, raw: dict, v: int, vd: int) -> tuple[int, ...] | None:
    """Checks ``d2t``/``t2d`` against each other and the config -> the draft's target ids (None = full vocab)."""
    has_d2t, has_t2d = "d2t" in raw, "t2d" in raw
    if vd == v and not has_d2t:
        if has_t2d and not raw["t2d"].read().all():
            raise CheckpointError(f"{where}: t2d masks target ids out but draft_vocab_size == vocab_size ({v})")
        return None
    if not has_d2t:
        raise CheckpointError(f"{where}: draft_vocab_size={vd} < vocab_size={v} but the checkpoint has no d2t "
                              "table (which target id each draft id stands for)")
    d2t = raw["d2t"].read()
    if d2t.shape != (vd,) or d2t.dtype.kind not in "iu":
        raise CheckpointError(f"{where}: d2t has shape {d2t.shape} ({d2t.dtype}); expected integer [{vd}] "
                              f"(draft_vocab_size)")
    sel = np.arange(vd, dtype=np.int64) + d2t.astype(np.int64)
    if np.any(sel < 0) or np.any(sel >= v) or np.any(np.diff(sel) <= 0):
        raise CheckpointError(f"{where}: d2t does not map draft ids to strictly ascending target ids in [0, {v})")
    if has_t2d:
        t2d = raw["t2d"].read()
        if t2d.shape != (v,) or t2d.dtype != np.bool_:
            raise CheckpointError(f"{where}: t2d has shape {t2d.shape} ({t2d.dtype}); expected bool [{v}]")
        if not np.array_equal(np.nonzero(t2d)[0], sel):
            raise CheckpointError(f"{where}: d2t and t2d disagree: t2d marks {int(t2d.sum())} target ids, d2t maps "
                                  f"to {vd}, and they are not the same set")
    return None if vd == v else tuple(int(i) for i in sel)


def finish_shared(path, fmt, d, where, raw, cfg, layer_field, file_ids, conv, verifier=None, draft_vocab_rows=None,
                  tensors=None, notes=(), algorithm=None) -> DraftCheckpoint:
    """The checks and record of a format that may leave the embedding / LM head to the target (``algorithm``:
    what the format files it as, when not the config's own)."""
    v = cfg.arch.vocab_size
    rows = {"embed_tokens.weight": v, "lm_head.weight": draft_vocab_rows or v}
    if cfg.has_markov:
        rows.update({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": draft_vocab_rows or v})
    check_tensors(where, cfg, raw, layer_field, file_ids, rows)
    if fmt in ("specforge", "zlab"):
        present = [k for k in SHARED if k in raw]
        if present:
            raise CheckpointError(f"{where}: {present} in a {FORMAT_LABELS[fmt]} checkpoint: these drafts share the "
                                  "target's embedding and LM head and never store them")
    if tensors is None:
        tensors = {k: handle_lazy(h) for k, h in raw.items()}
    shared = tuple(k for k in SHARED if k not in tensors)
    return DraftCheckpoint(path, fmt, algorithm or algorithm_of(cfg), cfg, tensors, shared,
                           file_listing(raw), layer_field, tuple(file_ids), conv, verifier=verifier,
                           notes=tuple(notes))


# ---- writing helpers ---------------------------------------------------------------------------------------

def backbone_dict(cfg: DraftConfig) -> dict:
    """The draft's Qwen3 fields (+ kept target noise), without DeepSpec's draft keys."""
    d = cfg.arch.to_hf_dict()
    d.update(json.loads(cfg.extra_json))
    d.update(model_type="qwen3", num_hidden_layers=cfg.num_draft_layers,
             layer_types=["full_attention"] * cfg.num_draft_layers, tie_word_embeddings=False)
    return d


def llama_backbone(cfg: DraftConfig, d: dict) -> dict:
    """A Llama Eagle3 layer's backbone fields: ``model_type: llama``, without the Qwen3-only keys we add."""
    extra = json.loads(cfg.extra_json)
    for k in _QWEN3_ONLY:
        if k not in extra:
            d.pop(k, None)
    d["model_type"] = "llama"
    return d


def out_dtype(draft, options: ExportOptions) -> np.dtype:
    """The tensor dtype on disk: ``options.dtype``, else the draft's compute dtype (as ``dj.save_draft``)."""
    return np.dtype(jnp.dtype(options.dtype if options.dtype is not None else draft.dtype))


def deepspec_tensors(draft, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The draft's tensors under DeepSpec's names, cast to ``dtype``: what each writer renames or prunes."""
    return {k: (v if v.dtype == dtype else v.astype(dtype)) for k, v in draft_to_torch_tensors(draft).items()}


def vocab_tables(keep, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(``d2t``, ``t2d``) of the ascending target ids ``keep``: draft id -> offset to its target id, and the mask
    of kept target ids."""
    idx = np.asarray(keep, np.int64)
    t2d = np.zeros((v,), np.bool_)
    t2d[idx] = True
    return idx - np.arange(len(idx), dtype=np.int64), t2d


def write_dir(draft, path: str, tensors: dict, config: dict, dtype: np.dtype, max_shard_bytes: int) -> str:
    """Writes ``tensors``, ``config.json`` (with ``dtype``) and the draft's calibrated temperatures, if any."""
    config["dtype"] = dtype_name(dtype)
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:   # calibration travels with the weights
        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path
