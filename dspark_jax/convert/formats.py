"""Draft checkpoints in the formats other stacks write (docs/FORMATS.md; the formats: DRAFT_FORMATS.md).

Every format is read into the same draft modules through DeepSpec's tensor names: a reader turns a directory into
a :class:`DraftCheckpoint` (a canonical :class:`DraftConfig` plus a map from DeepSpec key to a lazy tensor), and a
writer turns a draft back into the format's ``config.json`` and tensors. The two conventions live in the config:

- tapped layers: ``DraftConfig.target_layer_ids`` are layer-*output* ids; speculators' ``aux`` ids are inputs,
  so ``aux = id + 1`` (``layer_ids_to`` / ``layer_ids_from``).
- block slots: ``slot_convention`` (anchor-first vs bonus-anchor); the file's ``block_size`` is the slot count
  (``num_block_slots``), ours the number of drafted tokens.

Formats: ``deepspec`` (Qwen3DSparkModel / Qwen3Eagle3Model), ``specforge`` (DSparkDraftModel with
``dflash_config``, and the Llama Eagle3 ``LlamaForCausalLMEagle3``; its DFlash export is the z-lab layout),
``speculators`` (``speculators_model_type``
dspark / dflash / eagle3, pruned vocab via ``d2t``/``t2d``), ``zlab`` (DFlashDraftModel, bonus-anchor).
What a format cannot represent is refused with the reason (:class:`FormatError`), never written lossily.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from dspark_jax.config import ConfigError, TargetConfig, read_config_json
from dspark_jax.convert.safetensors_io import CheckpointError, checkpoint_files, iter_tensors, save_shards
from dspark_jax.drafts import config as dcfg
from dspark_jax.drafts.config import (ANCHOR_FIRST, BONUS_ANCHOR, DSPARK_ARCH, EAGLE3_ARCH, EAGLE3_DEEPSPEC,
                                      EAGLE3_LLAMA, LAYER_INPUT, LAYER_OUTPUT, DraftConfig, layer_ids_from,
                                      specforge_eagle3_layer_ids)

from dspark_jax.drafts.temperatures import attach_saved_temperatures, save_temperatures
FORMATS = ("deepspec", "specforge", "speculators", "zlab")
FORMAT_LABELS = {"deepspec": "DeepSpec", "specforge": "SpecForge", "speculators": "vLLM speculators",
                 "zlab": "z-lab / SpecForge DFlash"}
SPECULATORS_VERSION = "0.7.0"
SPECULATORS_ARCHS = {"dspark": "DSparkDraftModel", "dflash": "DFlashDraftModel", "eagle3": "Eagle3DraftModel"}
SPECFORGE_DSPARK_ARCH = "DSparkDraftModel"
DFLASH_ARCH = "DFlashDraftModel"
SPECFORGE_EAGLE3_ARCH = "LlamaForCausalLMEagle3"
SPECFORGE_EAGLE3_TAPS = 3           # LlamaForCausalLMEagle3 builds fc as [H, 3 * H_target]
SPECFORGE_EAGLE3_LAYER_FIELD = "eagle_config.eagle_aux_hidden_state_layer_ids"
# Qwen3-only keys TargetConfig.to_hf_dict writes, left out of a Llama (Eagle3) backbone config
_QWEN3_ONLY = ("layer_types",)
DEFAULT_NUM_ANCHORS = 512           # a DeepSpec training setting no other format stores
DEFAULT_EAGLE3_TOKENS = 7           # Eagle3 chain drafts per round where a format does not say (DeepSpec ttt_length)
SHARED = ("embed_tokens.weight", "lm_head.weight")   # the target's tensors some formats leave out
# keys a format's config carries next to the backbone's; anything else is target noise kept verbatim
_MARKOV_KEYS = ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov")
_SPECULATORS_TOP = {"architectures", "auto_map", "speculators_model_type", "speculators_version",
                    "transformer_layer_config", "speculators_config", "draft_vocab_size", "target_hidden_size",
                    "tie_word_embeddings", "dtype", "torch_dtype", "transformers_version", "block_size",
                    "mask_token_id", "sample_from_anchor", "aux_hidden_state_layer_ids", "sliding_window_non_causal",
                    "eagle_aux_hidden_state_layer_ids", "norm_before_residual", "norm_before_fc", "fc_norm",
                    "norm_output", "embed_requires_grad", *_MARKOV_KEYS}
_DFLASH_CONFIG_KEYS = {"projector_type", "attention_mode", "mask_token_id", "target_layer_ids", "block_size",
                       "confidence_head_alpha", *_MARKOV_KEYS}
# file keys tolerated on read and dropped: speculators keeps verifier copies in the module (not saved, but
# older exports have them); d2t/t2d are consumed into DraftConfig.draft_vocab
_DROPPED_ON_READ = ("verifier_lm_head.weight", "verifier_norm.weight")


class FormatError(ConfigError):
    """A checkpoint or a conversion that a format cannot represent; the message says why and what to do."""


# ---- lazy tensors ------------------------------------------------------------------------------------------

class _Lazy:
    """A tensor known by shape, read on demand (``read_state`` handles)."""

    def __init__(self, shape: tuple, read: Callable[[], np.ndarray], source: str):
        self.shape, self._read, self.source = tuple(shape), read, source

    def read(self) -> np.ndarray:
        arr = self._read()
        if tuple(arr.shape) != self.shape:   # the shape was promised before reading (a target's file may lie)
            raise CheckpointError(f"{self.source}: has shape {tuple(arr.shape)}, expected {self.shape}")
        return arr


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


def _is_gemma4(cfg: DraftConfig) -> bool:
    gemma4 = getattr(dcfg, "GEMMA4_ARCHITECTURES", None) or (getattr(dcfg, "GEMMA4_DSPARK_ARCH", None),)
    return cfg.architecture in gemma4


def algorithm_of(cfg: DraftConfig) -> str:
    if cfg.is_eagle3:
        return "eagle3"
    return "dspark" if (cfg.has_markov or cfg.has_confidence) else "dflash"


# ---- detection ---------------------------------------------------------------------------------------------

def detect_format(d: Mapping[str, Any], where: str = "config.json") -> str:
    """``config.json`` -> one of :data:`FORMATS` (DRAFT_FORMATS §6.11's sniffing order), or a FormatError."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else None
    if "speculators_model_type" in d:
        return "speculators"
    if arch == SPECFORGE_EAGLE3_ARCH:
        return "specforge"
    dflash_config = d.get("dflash_config")
    if isinstance(dflash_config, dict):
        proj = dflash_config.get("projector_type")
        if arch == SPECFORGE_DSPARK_ARCH or proj == "dspark" or (arch == DSPARK_ARCH and "target_layer_ids" not in d):
            return "specforge"
        if arch == DFLASH_ARCH:
            if proj not in (None, "dflash"):
                raise FormatError(f"{where}: dflash_config.projector_type={proj!r} (a SpecForge Domino/other "
                                  "variant) is not a DFlash or DSpark draft this loader knows")
            if any(k in d for k in ("markov_rank", "markov_head_type")):
                raise FormatError(f"{where}: a {DFLASH_ARCH} config with Markov fields is ambiguous (a fork-"
                                  "exported DSpark?); rename it to the DeepSpec or speculators layout first")
            return "zlab"
    if arch in dcfg.ARCHITECTURES:
        return "deepspec"       # the DeepSpec parser names any missing field
    known = ", ".join(f"{f} ({FORMAT_LABELS[f]})" for f in FORMATS)
    raise ConfigError(f"{where}: architectures={archs!r} is not a draft format this loader knows; recognised: "
                      f"{known} (DeepSpec: architectures[0] in {dcfg.ARCHITECTURES}; speculators: "
                      "speculators_model_type; SpecForge/z-lab: dflash_config)")


# ---- reading -----------------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike, target=None) -> DraftCheckpoint:
    """Parses ``config.json`` and the safetensors headers (tensors stay on disk) and checks them against each
    other: tap count x hidden size vs ``fc``, vocab sizes, ``mask_token_id``, ``d2t``/``t2d``, conventions.

    ``target`` (optional: a loaded target, a TargetConfig, or an HF directory / config.json) is consulted only
    where the file leaves the tapped layers to the target's depth (SpecForge Eagle3 without ``eagle_config``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"draft checkpoint directory {path!r} does not exist")
    d, where = read_config_json(path)
    fmt = detect_format(d, where)
    files = checkpoint_files(path)
    raw = {}
    for file, key, handle in iter_tensors(files):
        if key.startswith("_orig_mod."):     # torch.compile's wrapper; DeepSpec strips it on save
            key = key[len("_orig_mod."):]
        if key in raw:
            raise CheckpointError(f"{file}: key {key!r} is given twice (with and without '_orig_mod.')")
        raw[key] = handle
    if fmt == "specforge" and (d.get("architectures") or [None])[0] == SPECFORGE_EAGLE3_ARCH:
        return _parse_specforge_eagle3(path, d, where, raw, target)
    parse = {"deepspec": _parse_deepspec, "specforge": _parse_specforge, "speculators": _parse_speculators,
             "zlab": _parse_zlab}[fmt]
    return parse(path, d, where, raw)


def _target_layer_count(target) -> int | None:
    if target is None:
        return None
    if isinstance(target, (str, os.PathLike)):
        from dspark_jax.targets.registry import target_config_from_json

        return target_config_from_json(target).num_hidden_layers
    # a family config (TargetConfig, DeepseekV3Config, ...) or a loaded target
    return getattr(target, "config", target).num_hidden_layers


def _file_listing(raw: dict) -> dict:
    out = {}
    for k, h in raw.items():
        sl = h._handle.get_slice(h.key)
        out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return out


def _handle_lazy(h) -> _Lazy:
    return _Lazy(h.shape, h.read, f"{os.path.basename(h.path)}:{h.key}")


def _arch_config(d: Mapping[str, Any], where: str, drop: set,
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


def _make_config(where: str, **kw) -> DraftConfig:
    try:
        return DraftConfig(**kw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None


def _ids(value, field: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in value):
        raise ConfigError(f"{where}: {field} must be a non-empty list of integers, got {value!r}")
    return tuple(value)


def _bool(d: Mapping, key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _check_tensors(ck_where: str, cfg: DraftConfig, raw: dict, layer_field: str, file_ids: tuple[int, ...],
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


def _parse_deepspec(path, d, where, raw) -> DraftCheckpoint:
    cfg = DraftConfig.from_hf_dict(d, where=where)
    v = cfg.arch.vocab_size
    rows = {"embed_tokens.weight": v, "lm_head.weight": v}
    if cfg.has_markov:
        rows.update({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": v})
    _check_tensors(where, cfg, raw, "target_layer_ids", cfg.target_layer_ids, rows)
    shared = tuple(k for k in SHARED if k not in raw)
    if shared:
        # DeepSpec's own loader would initialise them at random; refuse rather than pretend
        raise CheckpointError(f"{where}: a DeepSpec draft must store {list(shared)} (the frozen target copies); "
                              "they are missing")
    return DraftCheckpoint(path, "deepspec", algorithm_of(cfg), cfg, {k: _handle_lazy(h) for k, h in raw.items()},
                           (), _file_listing(raw), "target_layer_ids", cfg.target_layer_ids, LAYER_OUTPUT,
                           verifier=cfg.target_model_name_or_path)


def _parse_specforge(path, d, where, raw) -> DraftCheckpoint:
    dc = d["dflash_config"]
    proj = dc.get("projector_type", "dspark")
    if proj != "dspark":
        raise FormatError(f"{where}: dflash_config.projector_type={proj!r}; a SpecForge DSpark export has 'dspark'")

    def field(k, default=None):
        # the SGLang-normalised export hoists the Markov keys to the top level (DRAFT_FORMATS §2.5)
        return dc[k] if k in dc else d.get(k, default)

    for k in ("mask_token_id", "target_layer_ids"):
        if field(k) is None:
            raise ConfigError(f"{where}: missing field dflash_config.{k}")
    if "block_size" not in d and "block_size" not in dc:
        raise ConfigError(f"{where}: missing field 'block_size'")
    arch, extra = _arch_config(d, where, {"dflash_config", "block_size", "num_target_layers", "architectures",
                                          "auto_map", *_MARKOV_KEYS, "target_layer_ids", "mask_token_id"})
    ids = _ids(field("target_layer_ids"), "dflash_config.target_layer_ids", where)
    rank = int(field("markov_rank", 0))
    alpha = field("confidence_head_alpha")
    # SpecForge turns the head on when its loss weight is positive, unless the flag says otherwise
    conf = field("enable_confidence_head", bool(alpha is not None and alpha > 0))
    if not isinstance(conf, bool):
        raise ConfigError(f"{where}: dflash_config.enable_confidence_head must be true or false, got {conf!r}")
    mode = field("attention_mode")
    if mode is not None and mode != ("gqa" if arch.num_key_value_heads < arch.num_attention_heads else "mha"):
        raise ConfigError(f"{where}: dflash_config.attention_mode={mode!r} does not match num_key_value_heads="
                          f"{arch.num_key_value_heads} / num_attention_heads={arch.num_attention_heads}")
    cfg = _make_config(
        where, architecture=DSPARK_ARCH, block_size=int(d.get("block_size", dc.get("block_size"))),
        mask_token_id=int(field("mask_token_id")), target_layer_ids=ids, num_anchors=DEFAULT_NUM_ANCHORS,
        num_target_layers=d.get("num_target_layers"), markov_rank=rank,
        markov_head_type=str(field("markov_head_type", "vanilla")),
        enable_confidence_head=conf,
        confidence_head_with_markov=bool(field("confidence_head_with_markov", True)),
        num_draft_layers=arch.num_hidden_layers, arch=arch, extra_json=extra,
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"), slot_convention=ANCHOR_FIRST)
    # legacy SpecForge DSpark checkpoints nest the heads under logit_head. (its loader strips it too)
    raw = {(k[len("logit_head."):] if k.startswith("logit_head.") else k): h for k, h in raw.items()}
    return _finish_shared(path, "specforge", d, where, raw, cfg, "dflash_config.target_layer_ids", ids, LAYER_OUTPUT)


def _parse_zlab(path, d, where, raw) -> DraftCheckpoint:
    dc = d["dflash_config"]
    for k in ("mask_token_id", "target_layer_ids"):
        if k not in dc:
            raise ConfigError(f"{where}: missing field dflash_config.{k}")
    # older z-lab heads keep block_size at the top level, newer ones inside dflash_config
    bs = d.get("block_size", dc.get("block_size"))
    if bs is None:
        raise ConfigError(f"{where}: missing field 'block_size' (top level or dflash_config)")
    if not isinstance(bs, int) or bs < 2:
        raise ConfigError(f"{where}: block_size={bs!r}: a bonus-anchor block needs the anchor slot plus >= 1 draft")
    if dc.get("sample_from_anchor"):
        raise FormatError(f"{where}: dflash_config.sample_from_anchor=true is not a z-lab/SpecForge DFlash draft "
                          "(those are bonus-anchor); write it in the speculators layout instead")
    arch, extra = _arch_config(d, where, {"dflash_config", "block_size", "num_target_layers", "architectures",
                                          "auto_map"})
    ids = _ids(dc["target_layer_ids"], "dflash_config.target_layer_ids", where)
    cfg = _make_config(
        where, architecture=DSPARK_ARCH, block_size=bs - 1, slot_convention=BONUS_ANCHOR,
        mask_token_id=int(dc["mask_token_id"]), target_layer_ids=ids, num_anchors=DEFAULT_NUM_ANCHORS,
        num_target_layers=d.get("num_target_layers"), markov_rank=0, enable_confidence_head=False,
        num_draft_layers=arch.num_hidden_layers, arch=arch, extra_json=extra,
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"))
    return _finish_shared(path, "zlab", d, where, raw, cfg, "dflash_config.target_layer_ids", ids, LAYER_OUTPUT)


def _parse_specforge_eagle3(path, d, where, raw, target=None) -> DraftCheckpoint:
    """SpecForge / SGLang ``LlamaForCausalLMEagle3`` (DRAFT_FORMATS §2.4): a LlamaConfig with ``draft_vocab_size``
    and ``eagle_config.eagle_aux_hidden_state_layer_ids`` (3 ids, output convention); tensors ``midlayer.*``,
    ``fc [H, 3H]``, ``norm``, trained ``lm_head [Vd, H]``, ``d2t``/``t2d``, ``embed_tokens`` only when not frozen."""
    field = SPECFORGE_EAGLE3_LAYER_FIELD
    mt = d.get("model_type", "llama")
    if mt != "llama":
        raise FormatError(f"{where}: a {SPECFORGE_EAGLE3_ARCH} config has model_type={mt!r}; SpecForge writes "
                          "'llama' (its draft layer is a LlamaDecoderLayer whatever the target is)")
    for k, what in (("fc_norm", "per-tap RMSNorms before fc"), ("norm_output", "a normed recurrent output")):
        if _bool(d, k, False, where):
            raise FormatError(f"{where}: {k}=true ({what}); the Eagle3 draft here has neither (fc_norm=false, "
                              "norm_output=false)")
    for k in ("attention_bias", "mlp_bias"):
        if _bool(d, k, False, where):
            raise FormatError(f"{where}: {k}=true, but {SPECFORGE_EAGLE3_ARCH} builds its projections without bias "
                              "whatever the config says: this config does not describe a SpecForge Eagle3 checkpoint")
    if "draft_vocab_size" not in d:
        raise ConfigError(f"{where}: missing field 'draft_vocab_size' ({SPECFORGE_EAGLE3_ARCH} sizes lm_head "
                          "[draft_vocab_size, H] from it)")
    ec = d.get("eagle_config")
    if ec is not None and not isinstance(ec, dict):
        raise ConfigError(f"{where}: eagle_config must be an object, got {ec!r}")
    notes = [f"the format stores no drafting length: {DEFAULT_EAGLE3_TOKENS} chain drafts per round (DeepSpec's "
             "ttt_length default)"]
    if not ec or ec.get("eagle_aux_hidden_state_layer_ids") is None:
        # SpecForge's released configs (e.g. configs/qwen3-4b-eagle3.json) leave the taps to the target's depth
        t = _target_layer_count(target)
        if t is None:
            raise FormatError(
                f"{where}: no {field}: SpecForge/SGLang then tap [1, T//2-1, T-4] of a T-layer target (output "
                "convention), which the file does not record; pass the target (--target DIR / target=...) or add "
                "eagle_config: {\"eagle_aux_hidden_state_layer_ids\": [...]} (e.g. [1, 17, 32] for a 36-layer "
                "target: dspark_jax.drafts.config.specforge_eagle3_layer_ids)")
        ids = specforge_eagle3_layer_ids(t)
        if not 0 <= ids[0] < ids[1] < ids[2] < t - 1:
            raise FormatError(f"{where}: no {field}, and SpecForge's default [1, T//2-1, T-4] = {list(ids)} is not a "
                              f"valid tap list for the {t}-layer target; add eagle_config with the ids it was "
                              "trained with")
        notes.append(f"no {field} in the file: SpecForge's default [1, T//2-1, T-4] = {list(ids)} for the "
                     f"{t}-layer target")
    else:
        ids = _ids(ec["eagle_aux_hidden_state_layer_ids"], field, where)
    if len(ids) != SPECFORGE_EAGLE3_TAPS:
        raise FormatError(f"{where}: {field}={list(ids)} lists {len(ids)} layers; {SPECFORGE_EAGLE3_ARCH} fuses "
                          f"exactly {SPECFORGE_EAGLE3_TAPS} (fc is [H, 3 * H])")
    arch, extra = _arch_config(d, where, {"architectures", "auto_map", "eagle_config", "draft_vocab_size",
                                          "target_hidden_size", "fc_norm", "norm_output"}, model_types=("llama",))
    if d.get("target_hidden_size") not in (None, arch.hidden_size):
        raise FormatError(f"{where}: target_hidden_size={d['target_hidden_size']} differs from the draft's "
                          f"hidden_size {arch.hidden_size}; drafts here fuse taps of the draft's own width")
    if arch.num_hidden_layers != 1:
        raise FormatError(f"{where}: num_hidden_layers={arch.num_hidden_layers}, but {SPECFORGE_EAGLE3_ARCH} has "
                          "exactly one draft layer (midlayer) whatever the config says")
    if arch.rope.rope_type not in ("default", "llama3"):
        raise FormatError(f"{where}: RoPE type {arch.rope.rope_type!r}: SpecForge's Llama Eagle3 computes its "
                          "linear / dynamic / yarn RoPE with its own code (base 10000, whatever rope_theta says), "
                          "which is not reproduced here; only default and llama3 RoPE are read")
    v = arch.vocab_size
    vd = d["draft_vocab_size"]
    if not isinstance(vd, int) or isinstance(vd, bool) or not 0 < vd <= v:
        raise ConfigError(f"{where}: draft_vocab_size={vd!r} must be an integer in [1, vocab_size={v}]")
    named = {}
    for k, h in raw.items():
        key = "layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k
        if key in named:
            raise CheckpointError(f"{where}: {key!r} is given twice (as midlayer.* and layers.0.*)")
        named[key] = h
    lm = named.get("lm_head.weight")
    if lm is None:
        raise CheckpointError(f"{where}: no lm_head.weight: a {SPECFORGE_EAGLE3_ARCH} checkpoint stores its trained "
                              "[draft_vocab_size, H] head")
    if lm.shape[0] != vd:
        raise CheckpointError(f"{where}: lm_head.weight has {lm.shape[0]} rows but draft_vocab_size={vd}")
    draft_vocab = _read_vocab_tables(where, named, v, vd)
    cfg = _make_config(where, architecture=EAGLE3_ARCH, eagle3_variant=EAGLE3_LLAMA, target_layer_ids=ids,
                       num_draft_layers=1, ttt_length=DEFAULT_EAGLE3_TOKENS, markov_rank=0,
                       enable_confidence_head=False, mask_token_id=0, num_anchors=DEFAULT_NUM_ANCHORS, arch=arch,
                       extra_json=extra, dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
                       draft_vocab=draft_vocab)
    _check_tensors(where, cfg, named, field, ids, {"embed_tokens.weight": v})
    tensors = {k: _handle_lazy(h) for k, h in named.items() if k not in ("d2t", "t2d")}
    if draft_vocab is not None:
        tensors["lm_head.weight"] = _scatter(tensors["lm_head.weight"], draft_vocab, v)
    shared = tuple(k for k in ("embed_tokens.weight",) if k not in tensors)
    return DraftCheckpoint(path, "specforge", "eagle3", cfg, tensors, shared, _file_listing(raw), field, ids,
                           LAYER_OUTPUT, notes=tuple(notes))


def _finish_shared(path, fmt, d, where, raw, cfg, layer_field, file_ids, conv, verifier=None, draft_vocab_rows=None,
                   tensors=None, notes=()):
    v = cfg.arch.vocab_size
    rows = {"embed_tokens.weight": v, "lm_head.weight": draft_vocab_rows or v}
    if cfg.has_markov:
        rows.update({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": draft_vocab_rows or v})
    _check_tensors(where, cfg, raw, layer_field, file_ids, rows)
    if fmt in ("specforge", "zlab"):
        present = [k for k in SHARED if k in raw]
        if present:
            raise CheckpointError(f"{where}: {present} in a {FORMAT_LABELS[fmt]} checkpoint: these drafts share the "
                                  "target's embedding and LM head and never store them")
    if tensors is None:
        tensors = {k: _handle_lazy(h) for k, h in raw.items()}
    shared = tuple(k for k in SHARED if k not in tensors)
    return DraftCheckpoint(path, fmt, algorithm_of(cfg) if fmt != "zlab" else "dflash", cfg, tensors, shared,
                           _file_listing(raw), layer_field, tuple(file_ids), conv, verifier=verifier,
                           notes=tuple(notes))


def _parse_speculators(path, d, where, raw) -> DraftCheckpoint:
    alg = d.get("speculators_model_type")
    if alg not in SPECULATORS_ARCHS:
        raise FormatError(f"{where}: speculators_model_type={alg!r}; supported: {sorted(SPECULATORS_ARCHS)}")
    tlc = d.get("transformer_layer_config")
    if not isinstance(tlc, dict):
        raise ConfigError(f"{where}: missing field 'transformer_layer_config'")
    sc = d.get("speculators_config") or {}
    methods = sc.get("proposal_methods") or [{}] if isinstance(sc, dict) else None
    if not isinstance(methods, list) or not isinstance(methods[0], dict):
        raise ConfigError(f"{where}: speculators_config.proposal_methods must be a list of objects")
    spec_tokens = methods[0].get("speculative_tokens")
    verifier = (sc.get("verifier") or {}).get("name_or_path")
    arch, extra = _arch_config(tlc, f"{where} transformer_layer_config", {"architectures", "auto_map"},
                               model_types=("qwen3", "llama") if alg == "eagle3" else ("qwen3",))
    llama = alg == "eagle3" and tlc.get("model_type", "qwen3") == "llama"
    if d.get("target_hidden_size") not in (None, arch.hidden_size):
        raise FormatError(f"{where}: target_hidden_size={d['target_hidden_size']} differs from the draft's "
                          f"hidden_size {arch.hidden_size}; drafts here fuse taps of the draft's own width")
    dtype = str(d.get("dtype") or d.get("torch_dtype") or tlc.get("dtype") or "bfloat16")
    v = arch.vocab_size
    vd = d.get("draft_vocab_size", v)
    if not isinstance(vd, int) or not 0 < vd <= v:
        raise ConfigError(f"{where}: draft_vocab_size={vd!r} must be an integer in [1, vocab_size={v}]")
    draft_vocab = _read_vocab_tables(where, raw, v, vd)
    common = dict(mask_token_id=0, num_anchors=DEFAULT_NUM_ANCHORS, num_draft_layers=arch.num_hidden_layers,
                  arch=arch, extra_json=extra, dtype=dtype, draft_vocab=draft_vocab)
    if alg == "eagle3":
        field = "eagle_aux_hidden_state_layer_ids"
        if field not in d:
            raise ConfigError(f"{where}: missing field {field!r}")
        file_ids = _ids(d[field], field, where)
        for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
            if _bool(d, k, False, where):
                raise FormatError(f"{where}: {k}=true; DeepSpec's Eagle3 (the module here) is {k}=false")
        if arch.num_hidden_layers != 1:
            raise FormatError(f"{where}: a {arch.num_hidden_layers}-layer speculators Eagle3 feeds [emb ; hidden] "
                              "only into layer 0; DeepSpec's Eagle3 feeds it into every layer, so only 1 layer maps")
        if llama:
            for k in ("attention_bias", "mlp_bias"):
                if _bool(tlc, k, False, f"{where} transformer_layer_config"):
                    raise FormatError(f"{where}: transformer_layer_config.{k}=true; the Llama Eagle3 layer here "
                                      "(SpecForge's) has no biases")
        elif len(file_ids) != 5:
            raise FormatError(f"{where}: {field} lists {len(file_ids)} layers; DeepSpec's Eagle3 (the module here) "
                              "fuses exactly 5")
        if spec_tokens is not None and (not isinstance(spec_tokens, int) or spec_tokens < 1):
            raise ConfigError(f"{where}: speculators_config.proposal_methods[0].speculative_tokens={spec_tokens!r}")
        cfg = _make_config(where, architecture=EAGLE3_ARCH, target_layer_ids=layer_ids_from(file_ids, LAYER_INPUT),
                           ttt_length=int(spec_tokens or DEFAULT_EAGLE3_TOKENS), target_model_name_or_path=verifier,
                           markov_rank=0, enable_confidence_head=False,
                           eagle3_variant=EAGLE3_LLAMA if llama else EAGLE3_DEEPSPEC, **common)
        return _speculators_finish(path, d, where, raw, cfg, field, file_ids, verifier, vd)
    field = "aux_hidden_state_layer_ids"
    for k in (field, "block_size", "mask_token_id"):
        if k not in d:
            raise ConfigError(f"{where}: missing field {k!r}")
    file_ids = _ids(d[field], field, where)
    bs = d["block_size"]
    # absent = bonus-anchor: DSpark before speculators' 2026-07-13 change, and DFlash's default
    sfa = _bool(d, "sample_from_anchor", False, where)
    if spec_tokens is not None and spec_tokens != (bs if sfa else bs - 1):
        raise ConfigError(
            f"{where}: sample_from_anchor={str(sfa).lower()} with block_size={bs} drafts {bs if sfa else bs - 1} "
            f"tokens per block, but speculators_config.proposal_methods[0].speculative_tokens={spec_tokens}: the "
            "slot convention flag does not match the checkpoint")
    if _bool(d, "sliding_window_non_causal", False, where):
        raise FormatError(f"{where}: sliding_window_non_causal=true has no equivalent here")
    notes = []
    if alg == "dspark" and "sample_from_anchor" not in d:
        notes.append("no sample_from_anchor key: read as bonus-anchor (speculators DSpark before 2026-07-13)")
    if alg == "dspark":
        rank = d.get("markov_rank", 256)
        kw = dict(markov_rank=int(rank), markov_head_type=str(d.get("markov_head_type", "vanilla")),
                  enable_confidence_head=_bool(d, "enable_confidence_head", True, where),
                  confidence_head_with_markov=_bool(d, "confidence_head_with_markov", True, where))
    else:
        kw = dict(markov_rank=0, enable_confidence_head=False)
    common["mask_token_id"] = int(d["mask_token_id"])
    cfg = _make_config(where, architecture=DSPARK_ARCH, block_size=bs if sfa else bs - 1,
                       slot_convention=ANCHOR_FIRST if sfa else BONUS_ANCHOR,
                       target_layer_ids=layer_ids_from(file_ids, LAYER_INPUT), **kw, **common)
    return _speculators_finish(path, d, where, raw, cfg, field, file_ids, verifier, vd, notes)


def _read_vocab_tables(where: str, raw: dict, v: int, vd: int) -> tuple[int, ...] | None:
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


def _scatter(lazy: _Lazy, sel: tuple[int, ...], v: int) -> _Lazy:
    """A ``[Vd, k]`` draft-vocab tensor as ``[V, k]`` (zero rows outside ``sel``; proposals mask them anyway)."""
    def read():
        small = lazy.read()
        full = np.zeros((v,) + small.shape[1:], small.dtype)
        full[np.asarray(sel)] = small
        return full
    return _Lazy((v,) + lazy.shape[1:], read, lazy.source)


def _speculators_finish(path, d, where, raw, cfg, field, file_ids, verifier, vd, notes=()):
    v = cfg.arch.vocab_size
    tensors = {k: _handle_lazy(h) for k, h in raw.items() if k not in ("d2t", "t2d", *_DROPPED_ON_READ)}
    _check_tensors(where, cfg, raw, field, file_ids,
                   {"embed_tokens.weight": v, "lm_head.weight": vd,
                    **({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": vd}
                       if cfg.has_markov else {})})
    if cfg.draft_vocab is not None:
        if "lm_head.weight" not in tensors:
            raise CheckpointError(f"{where}: a pruned-vocab checkpoint (draft_vocab_size={vd}) must store lm_head")
        for k in ("lm_head.weight", "markov_head.markov_w2.weight"):
            if k in tensors:
                tensors[k] = _scatter(tensors[k], cfg.draft_vocab, v)
    return _finish_shared(path, "speculators", d, where, raw, cfg, field, file_ids, LAYER_INPUT, verifier=verifier,
                          draft_vocab_rows=vd, tensors=tensors, notes=notes)


# ---- fitting a target --------------------------------------------------------------------------------------

def check_fits(ck: DraftCheckpoint, target_config: TargetConfig) -> DraftConfig:
    """The checkpoint's config bound to ``target_config``, or a ConfigError naming the file's field."""
    cfg, t = ck.config, target_config
    where = os.path.join(ck.path, "config.json")
    vocab_field = "transformer_layer_config.vocab_size" if ck.format == "speculators" else "vocab_size"
    if cfg.arch.vocab_size != t.vocab_size:
        raise ConfigError(f"{where}: {vocab_field}={cfg.arch.vocab_size} but the target's vocab has {t.vocab_size} "
                          "ids: the draft was trained for another tokenizer")
    if cfg.arch.hidden_size != t.hidden_size:
        raise ConfigError(f"{where}: hidden_size={cfg.arch.hidden_size} but the target's is {t.hidden_size}")
    n = t.num_hidden_layers
    if cfg.target_layer_ids[-1] >= n - 1:
        raise ConfigError(
            f"{where}: {ck.layer_field}={list(ck.file_layer_ids)} ({ck.layer_convention} convention; layer outputs "
            f"{list(cfg.target_layer_ids)}) does not fit a {n}-layer target: the last tappable output is layer {n - 2}")
    if cfg.num_target_layers is not None and cfg.num_target_layers != n:
        raise ConfigError(f"{where}: num_target_layers={cfg.num_target_layers} but the target has {n} layers")
    if not cfg.is_eagle3 and not 0 <= cfg.mask_token_id < t.vocab_size:
        raise ConfigError(f"{where}: mask_token_id={cfg.mask_token_id} is outside the target's vocab [0, {t.vocab_size})")
    return cfg.bind(t)


def target_source(target) -> tuple[TargetConfig, Callable[[str], np.ndarray]]:
    """A loaded target, or an HF target directory -> (its config, DeepSpec key -> the target's ``[V, H]`` copy of
    ``embed_tokens.weight`` / ``lm_head.weight``). A directory is not loaded: only those two tensors are read
    (a float32 copy of an 8B target would need 32 GB to fill in two matrices)."""
    if not isinstance(target, (str, os.PathLike)):
        def from_module(key):
            embed = np.asarray(target.embed_tokens.embedding[...])
            if key == "embed_tokens.weight" or target.lm_head is None:
                return embed
            return np.asarray(target.lm_head.kernel[...]).T
        return target.config, from_module
    path = os.fspath(target)
    from dspark_jax.targets.registry import target_config_from_json

    tcfg = target_config_from_json(path)
    names = ("model.embed_tokens.weight", "lm_head.weight")
    handles = {k: h for _, k, h in iter_tensors(checkpoint_files(path)) if k in names}

    def from_files(key):
        want = "lm_head.weight" if key == "lm_head.weight" and not tcfg.tie_word_embeddings else names[0]
        if want not in handles:
            raise CheckpointError(f"target {path}: no {want!r} to take the draft's {key} from")
        return handles[want].read()
    return tcfg, from_files


# ---- loading -----------------------------------------------------------------------------------------------

def load_checkpoint(ck: DraftCheckpoint, dtype=None, *, target=None, sharding=None, attention_impl: str = "auto",
                    shared_placeholder: bool = False):
    """A :class:`DraftCheckpoint` -> draft module. Tensors the file leaves to the target come from ``target``
    (a loaded target, or an HF directory); ``shared_placeholder`` fills them with zeros instead (only for
    converting between formats that both leave them out)."""
    from flax import nnx

    from dspark_jax.convert.deepspec import _draft_class
    from dspark_jax.convert.keymap import read_state, resolve_dtype
    from dspark_jax.convert.keymap import fill_state
    from dspark_jax.convert.names import DEEPSPEC_IGNORED

    if _is_gemma4(ck.config):     # DeepSpec-only (no other format has a Gemma4 backbone): its own loader
        from dspark_jax.convert.gemma4_draft import load_gemma4_draft

        return load_gemma4_draft(ck.path, dtype, sharding=sharding, attention_impl=attention_impl)
    source = None if target is None else target_source(target)
    cfg = ck.config if source is None else check_fits(ck, source[0])
    tensors = dict(ck.tensors)
    if ck.shared:
        if source is not None:
            for k in ck.shared:
                tensors[k] = _Lazy((cfg.arch.vocab_size, cfg.arch.hidden_size), lambda k=k: source[1](k),
                                   f"target:{k}")
        elif shared_placeholder:
            v, h = cfg.arch.vocab_size, cfg.arch.hidden_size
            for k in ck.shared:
                tensors[k] = _Lazy((v, h), lambda: np.zeros((v, h), np.float32), f"placeholder:{k}")
        else:
            raise CheckpointError(
                f"{ck.path}: this {ck.label} checkpoint does not store {list(ck.shared)} (it shares the target's); "
                "pass the target (dj.load_draft(path, target=...) / --target DIR) to fill them in")
    dt = resolve_dtype(dtype if dtype is not None else cfg.dtype)
    cls, rules = _draft_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dt, attention_impl=attention_impl))
    graphdef, abs_state = nnx.split(abstract)
    stream = ((t.source, k, t) for k, t in tensors.items())
    values = read_state(abs_state, [], rules, DEEPSPEC_IGNORED, dt, sharding, tensors=stream)
    draft = nnx.merge(graphdef, fill_state(abs_state, values))
    return attach_saved_temperatures(draft, ck.path)


# ---- writing -----------------------------------------------------------------------------------------------

def _backbone_dict(cfg: DraftConfig) -> dict:
    """The draft's Qwen3 fields (+ kept target noise), without DeepSpec's draft keys."""
    d = cfg.arch.to_hf_dict()
    d.update(json.loads(cfg.extra_json))
    d.update(model_type="qwen3", num_hidden_layers=cfg.num_draft_layers,
             layer_types=["full_attention"] * cfg.num_draft_layers, tie_word_embeddings=False)
    return d


def _refuse(fmt: str, why: str) -> None:
    raise FormatError(f"cannot write this draft as {FORMAT_LABELS[fmt]}: {why}")


def plan_export(cfg: DraftConfig, fmt: str, *, pruned: bool = False, allow_nonstandard: bool = False) -> str:
    """What ``fmt`` would hold this draft as (``dspark``/``dflash``/``eagle3``), or a FormatError with the reason."""
    alg = algorithm_of(cfg)
    if fmt not in FORMATS:
        raise FormatError(f"unknown draft format {fmt!r}; one of {FORMATS}")
    if _is_gemma4(cfg) and fmt != "deepspec":
        _refuse(fmt, "only DeepSpec (and vLLM's Gemma4DSparkModel, which reads DeepSpec's files) has a Gemma4 "
                     "draft backbone")
    llama = cfg.is_eagle3 and cfg.eagle3_variant == EAGLE3_LLAMA
    if fmt == "deepspec":
        if llama:
            _refuse(fmt, "this is a Llama-style Eagle3 (SpecForge's LlamaForCausalLMEagle3: no q_norm/k_norm); "
                         "DeepSpec's Qwen3Eagle3Model has q/k norms, and zero-filling them is not the same layer")
        if pruned:
            _refuse(fmt, "DeepSpec drafts always propose over the full vocabulary (no d2t); un-pruning would give "
                         "formerly impossible tokens probability")
        if cfg.slot_convention == BONUS_ANCHOR and not allow_nonstandard:
            _refuse(fmt, "it uses the bonus-anchor slot convention, which DeepSpec's code has no flag for (it would "
                         "load and draft one position early). Write it as speculators (sample_from_anchor=false), or "
                         "pass --allow-nonstandard to add 'sample_from_anchor: false', which dspark-jax and vLLM's "
                         "native DSpark loader read but DeepSpec ignores")
        return alg
    if fmt == "speculators":
        if cfg.is_eagle3 and cfg.num_draft_layers != 1:
            _refuse(fmt, f"a {cfg.num_draft_layers}-layer DeepSpec Eagle3 feeds [emb ; hidden] into every layer; "
                         "speculators/vLLM Eagle3 feed it only into layer 0")
        if alg == "dflash" and cfg.slot_convention == ANCHOR_FIRST:
            # vLLM's speculators translator drops sample_from_anchor for "dflash" and runs it bonus-anchor, one
            # position early and silently; as a "dspark" with markov_rank 0 the flag is honoured (DRAFT_FORMATS R3)
            return "dspark"
        return alg
    if cfg.is_eagle3:
        if fmt == "zlab":
            _refuse(fmt, "z-lab checkpoints are DFlash drafts; an Eagle3 draft has no z-lab layout")
        if not llama:
            _refuse(fmt, "SpecForge's Eagle3 (LlamaForCausalLMEagle3) is a Llama layer without q/k norms and with "
                         f"exactly 3 taps; this is DeepSpec's Qwen3 Eagle3, whose q_norm/k_norm the format cannot "
                         f"hold (and it taps {cfg.num_taps} layers)")
        if cfg.num_taps != SPECFORGE_EAGLE3_TAPS:
            _refuse(fmt, f"SpecForge's LlamaForCausalLMEagle3 fuses exactly {SPECFORGE_EAGLE3_TAPS} tapped layers "
                         f"(fc is [H, 3 * H]); this draft taps {cfg.num_taps}: {list(cfg.target_layer_ids)}")
        if cfg.num_draft_layers != 1:
            _refuse(fmt, f"SpecForge's LlamaForCausalLMEagle3 has one draft layer (midlayer); this one has "
                         f"{cfg.num_draft_layers}")
        return "eagle3"
    if pruned:
        _refuse(fmt, "SpecForge DSpark / z-lab DFlash checkpoints have no d2t/t2d tables (full vocabulary only)")
    if fmt == "zlab" or (fmt == "specforge" and cfg.slot_convention == BONUS_ANCHOR):
        if cfg.slot_convention != BONUS_ANCHOR:
            _refuse(fmt, "z-lab/SpecForge DFlash drafts are bonus-anchor (slot k predicts its own position); this "
                         "draft is anchor-first (DeepSpec), and the runtime would draft one position early. Use "
                         "--to specforge (a DSpark export with markov_rank 0 keeps anchor-first) or speculators")
        if alg != "dflash":
            _refuse(fmt, "a bonus-anchor draft with a Markov or confidence head has no z-lab/SpecForge layout "
                         "(SpecForge DSpark is anchor-first); use --to speculators (sample_from_anchor=false)")
        return "dflash"
    return "dspark"


def export_draft(draft, path: str | os.PathLike, fmt: str, *, draft_vocab=None, allow_nonstandard: bool = False,
                 verifier: str | None = None, verifier_architectures=("Qwen3ForCausalLM",), dtype=None,
                 max_shard_bytes: int = 50 * 2**30, store_embedding: bool = False) -> str:
    """Writes ``draft`` as ``fmt`` (one of :data:`FORMATS`).

    draft_vocab: prune to these target ids (speculators, and SpecForge Eagle3; explicit request; sorted, unique).
    store_embedding: SpecForge Eagle3 only: also write ``embed_tokens.weight`` (SpecForge drops the frozen
      embedding from its checkpoints, SGLang's export too; its HF export with ``--embedding-source`` keeps it).
    allow_nonstandard: DeepSpec only: write a bonus-anchor draft with ``sample_from_anchor: false``.
    verifier: speculators' ``verifier.name_or_path`` (default: the Eagle3 ``target_model_name_or_path``).
    dtype: tensor dtype on disk (None = the draft's compute dtype, as ``dj.save_draft``).
    """
    import jax.numpy as jnp

    from dspark_jax.convert.deepspec import draft_to_torch_tensors, save_draft
    from dspark_jax.convert.keymap import dtype_name

    cfg = draft.config
    path = os.fspath(path)
    sel = None
    if draft_vocab is not None:
        sel = tuple(sorted(set(int(i) for i in draft_vocab)))
        if cfg.draft_vocab is not None and not set(sel) <= set(cfg.draft_vocab):
            raise FormatError("the draft is already pruned; a new draft vocab must be a subset of its own ids")
        if not sel or sel[0] < 0 or sel[-1] >= cfg.arch.vocab_size:
            raise FormatError(f"draft vocab ids must lie in [0, {cfg.arch.vocab_size})")
        if fmt != "speculators" and not (fmt == "specforge" and cfg.is_eagle3):
            raise FormatError(f"vocabulary pruning is only written in the speculators format and SpecForge Eagle3 "
                              f"(d2t/t2d), not {fmt!r}")
    elif cfg.draft_vocab is not None:
        sel = cfg.draft_vocab
    pruned = sel is not None and len(sel) < cfg.arch.vocab_size
    alg = plan_export(cfg, fmt, pruned=pruned, allow_nonstandard=allow_nonstandard)
    if fmt == "deepspec":
        return save_draft(draft, path, max_shard_bytes=max_shard_bytes, dtype=dtype)
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else draft.dtype))
    tensors = {k: (v if v.dtype == out_dtype else v.astype(out_dtype)) for k, v in draft_to_torch_tensors(draft).items()}
    if fmt == "specforge" and alg == "eagle3":
        idx = np.asarray(sel if pruned else range(cfg.arch.vocab_size), np.int64)
        tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                   for k, v in tensors.items()}
        if pruned:
            tensors["lm_head.weight"] = np.ascontiguousarray(tensors["lm_head.weight"][idx])
        if not store_embedding:
            tensors.pop("embed_tokens.weight")
        tensors["d2t"] = idx - np.arange(len(idx), dtype=np.int64)     # always saved, zeros for a full vocab
        t2d = np.zeros((cfg.arch.vocab_size,), np.bool_)
        t2d[idx] = True
        tensors["t2d"] = t2d
        config = _specforge_eagle3_config(cfg, len(idx))
    elif fmt == "speculators":
        config = _speculators_config(cfg, alg, verifier, verifier_architectures, len(sel) if pruned else None)
        if pruned:
            idx = np.asarray(sel, np.int64)
            tensors["lm_head.weight"] = np.ascontiguousarray(tensors["lm_head.weight"][idx])
            if "markov_head.markov_w2.weight" in tensors:
                tensors["markov_head.markov_w2.weight"] = np.ascontiguousarray(
                    tensors["markov_head.markov_w2.weight"][idx])
            tensors["d2t"] = idx - np.arange(len(idx), dtype=np.int64)
            t2d = np.zeros((cfg.arch.vocab_size,), np.bool_)
            t2d[idx] = True
            tensors["t2d"] = t2d
    else:
        for k in SHARED:
            tensors.pop(k)
        config = _specforge_config(cfg) if alg == "dspark" else _zlab_config(cfg)
    config["dtype"] = dtype_name(out_dtype)
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if getattr(draft, "sts_temperatures", None) is not None:
        save_temperatures(os.path.join(path, "sts_temperatures.json"), draft.sts_temperatures)
    return path


def _specforge_config(cfg: DraftConfig) -> dict:
    d = _backbone_dict(cfg)
    a = cfg.arch
    d.update(architectures=[SPECFORGE_DSPARK_ARCH], auto_map={"AutoModel": "dspark.DSparkDraftModel"},
             block_size=cfg.num_block_slots)
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    d["dflash_config"] = {
        "projector_type": "dspark", "attention_mode": "gqa" if a.num_key_value_heads < a.num_attention_heads else "mha",
        "mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids),
        "markov_rank": cfg.markov_rank, "markov_head_type": cfg.markov_head_type,
        "enable_confidence_head": cfg.enable_confidence_head,
        "confidence_head_with_markov": cfg.confidence_head_with_markov}
    return d


def _llama_backbone(cfg: DraftConfig, d: dict) -> dict:
    """A Llama Eagle3 layer's backbone fields: ``model_type: llama``, without the Qwen3-only keys we add."""
    extra = json.loads(cfg.extra_json)
    for k in _QWEN3_ONLY:
        if k not in extra:
            d.pop(k, None)
    d["model_type"] = "llama"
    return d


def _specforge_eagle3_config(cfg: DraftConfig, vd: int) -> dict:
    # target_hidden_size is not written: LlamaForCausalLMEagle3 checks hasattr(config, "target_hidden_size"), so
    # even a null would be used as the fc width
    d = _llama_backbone(cfg, _backbone_dict(cfg))
    # kept as read (SpecForge configs copy it from the target config)
    d.update(architectures=[SPECFORGE_EAGLE3_ARCH], draft_vocab_size=vd,
             tie_word_embeddings=cfg.arch.tie_word_embeddings,
             eagle_config={"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids)})
    return d


def _zlab_config(cfg: DraftConfig) -> dict:
    d = _backbone_dict(cfg)
    d.update(architectures=[DFLASH_ARCH], auto_map={"AutoModel": "dflash.DFlashDraftModel"},
             block_size=cfg.num_block_slots)
    if cfg.num_target_layers is not None:
        d["num_target_layers"] = cfg.num_target_layers
    d["dflash_config"] = {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)}
    return d


def _speculators_config(cfg: DraftConfig, alg: str, verifier, verifier_archs, vd: int | None) -> dict:
    tlc = _backbone_dict(cfg)
    for k in ("architectures", "dtype", "transformers_version"):
        tlc.pop(k, None)
    if cfg.is_eagle3 and cfg.eagle3_variant == EAGLE3_LLAMA:
        tlc = _llama_backbone(cfg, tlc)         # vLLM: model_type llama -> Eagle3LlamaForCausalLM (no q/k norms)
    v = cfg.arch.vocab_size
    if cfg.is_eagle3:
        tokens = cfg.ttt_length
        verifier = verifier if verifier is not None else cfg.target_model_name_or_path
    else:
        tokens = cfg.block_size
    d: dict[str, Any] = {"architectures": [SPECULATORS_ARCHS[alg]], "speculators_model_type": alg,
                         "speculators_version": SPECULATORS_VERSION, "draft_vocab_size": vd or v,
                         "target_hidden_size": None, "tie_word_embeddings": False}
    if cfg.is_eagle3:
        d.update(eagle_aux_hidden_state_layer_ids=list(cfg.layer_ids(LAYER_INPUT)), norm_before_residual=False,
                 norm_before_fc=False, fc_norm=False, norm_output=False, embed_requires_grad=False)
    else:
        d.update(block_size=cfg.num_block_slots, mask_token_id=cfg.mask_token_id,
                 aux_hidden_state_layer_ids=list(cfg.layer_ids(LAYER_INPUT)),
                 sample_from_anchor=cfg.slot_convention == ANCHOR_FIRST, sliding_window_non_causal=False)
        if alg == "dspark":
            d.update(markov_rank=cfg.markov_rank, markov_head_type=cfg.markov_head_type,
                     enable_confidence_head=cfg.enable_confidence_head,
                     confidence_head_with_markov=cfg.confidence_head_with_markov)
    d["transformer_layer_config"] = tlc
    d["speculators_config"] = {
        "algorithm": alg, "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens, "accept_tolerance": 0.0,
                              "verifier_accept_k": 1}],
        "verifier": {"name_or_path": verifier, "architectures": list(verifier_archs)}}
    return d


# ---- inspect -----------------------------------------------------------------------------------------------

def describe(ck: DraftCheckpoint, target_config: TargetConfig | None = None) -> dict:
    """A JSON-able summary of a checkpoint (what ``dspark inspect`` prints)."""
    cfg = ck.config
    out: dict[str, Any] = {
        "path": ck.path, "format": ck.format, "format_label": FORMAT_LABELS[ck.format], "algorithm": ck.algorithm,
        "module": cfg.architecture,
        "layer_ids": {"field": ck.layer_field, "as_written": list(ck.file_layer_ids),
                      "convention": ck.layer_convention, "layer_outputs": list(cfg.target_layer_ids)},
        "hidden_size": cfg.arch.hidden_size, "num_draft_layers": cfg.num_draft_layers,
        "vocab_size": cfg.arch.vocab_size, "draft_vocab_size": cfg.draft_vocab_size or cfg.arch.vocab_size,
        "dtype": cfg.dtype, "shared_with_target": list(ck.shared), "verifier": ck.verifier,
        "tensors": {k: {"shape": list(s), "dtype": t} for k, (s, t) in sorted(ck.file_tensors.items())},
        "notes": list(ck.notes),
    }
    if cfg.is_eagle3:
        out["ttt_length"] = cfg.ttt_length
        out["eagle3_variant"] = cfg.eagle3_variant
    else:
        out.update(slot_convention=cfg.slot_convention, block_slots=cfg.num_block_slots,
                   drafts_per_block=cfg.block_size, mask_token_id=cfg.mask_token_id, markov_rank=cfg.markov_rank,
                   markov_head_type=cfg.markov_head_type if cfg.has_markov else None,
                   confidence_head=cfg.has_confidence)
    need = cfg.target_layer_ids[-1] + 2
    out["fits"] = (f"a target with hidden_size {cfg.arch.hidden_size}, vocab {cfg.arch.vocab_size} and "
                   + (f"{cfg.num_target_layers} layers" if cfg.num_target_layers else f">= {need} layers"))
    if target_config is not None:
        try:
            check_fits(ck, target_config)
            out["target_check"] = "ok"
        except ConfigError as e:
            out["target_check"] = f"does not fit: {e}"
    return out


def format_description(info: dict) -> str:
    lines = [f"{info['path']}: {info['format_label']} {info['algorithm']} draft (format {info['format']}; loads "
             f"as {info['module']})"]
    li = info["layer_ids"]
    lines.append(f"  tapped layers: {li['field']}={li['as_written']} ({li['convention']} convention) = outputs of "
                 f"target layers {li['layer_outputs']}")
    if "slot_convention" in info:
        how = ("slot k predicts the next token" if info["slot_convention"] == ANCHOR_FIRST
               else "slot k>=1 predicts its own position, slot 0 is the anchor")
        lines.append(f"  block: {info['block_slots']} slots, {info['drafts_per_block']} drafts per block "
                     f"({info['slot_convention']}: {how}); mask_token_id {info['mask_token_id']}")
        heads = []
        if info["markov_rank"]:
            heads.append(f"Markov {info['markov_head_type']} rank {info['markov_rank']}")
        if info["confidence_head"]:
            heads.append("confidence head")
        lines.append(f"  heads: {', '.join(heads) or 'none (DFlash)'}")
    else:
        layer = ("Llama Eagle3 layer (SpecForge midlayer): no q/k norms, no biases"
                 if info.get("eagle3_variant") == EAGLE3_LLAMA else "DeepSpec Qwen3 Eagle3 layer (q/k norms)")
        lines.append(f"  chain drafting, ttt_length {info['ttt_length']}; {layer}")
    lines.append(f"  backbone: {info['num_draft_layers']} layers, hidden {info['hidden_size']}, vocab "
                 f"{info['vocab_size']}" + (f", pruned draft vocab {info['draft_vocab_size']}"
                                            if info["draft_vocab_size"] != info["vocab_size"] else "")
                 + f", dtype {info['dtype']}")
    if info["shared_with_target"]:
        lines.append(f"  not stored (taken from the target at load): {', '.join(info['shared_with_target'])}")
    if info["verifier"]:
        lines.append(f"  verifier: {info['verifier']}")
    lines.append(f"  fits: {info['fits']}")
    if "target_check" in info:
        lines.append(f"  target check: {info['target_check']}")
    for n in info["notes"]:
        lines.append(f"  note: {n}")
    lines.append(f"  tensors ({len(info['tensors'])}):")
    for k, t in info["tensors"].items():
        lines.append(f"    {k:<48} {str(tuple(t['shape'])):<16} {t['dtype']}")
    return "\n".join(lines)
