"""vLLM speculators: ``speculators_model_type`` dspark / dflash / eagle3, the backbone under
``transformer_layer_config``, tapped layers as layer *inputs* (``aux = id + 1``), the slot convention as
``sample_from_anchor``, and a pruned draft vocabulary as ``d2t``/``t2d`` with the LM head cut to it."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dspark_jax.config import ConfigError
from dspark_jax.convert.families import BLOCK, EAGLE3, draft_family
from dspark_jax.convert.formats.common import (
    DEFAULT_EAGLE3_TOKENS,
    DEFAULT_NUM_ANCHORS,
    DraftCheckpoint,
    DraftFormat,
    ExportOptions,
    FormatError,
    arch_config,
    backbone_dict,
    bool_field,
    check_tensors,
    deepspec_tensors,
    finish_shared,
    handle_lazy,
    ids_field,
    llama_backbone,
    make_config,
    out_dtype,
    read_vocab_tables,
    refuse,
    scatter,
    vocab_tables,
    write_dir,
)
from dspark_jax.convert.safetensors_io import CheckpointError
from dspark_jax.drafts.config import (
    ANCHOR_FIRST,
    BONUS_ANCHOR,
    DSPARK_ARCH,
    EAGLE3_ARCH,
    EAGLE3_DEEPSPEC,
    EAGLE3_LLAMA,
    LAYER_INPUT,
    DraftConfig,
    layer_ids_from,
)

NAME = "speculators"
SPECULATORS_VERSION = "0.7.0"
SPECULATORS_ARCHS = {"dspark": "DSparkDraftModel", "dflash": "DFlashDraftModel", "eagle3": "Eagle3DraftModel"}
# file keys tolerated on read and dropped: speculators keeps verifier copies in the module (not saved, but
# older exports have them); d2t/t2d are consumed into DraftConfig.draft_vocab
_DROPPED_ON_READ = ("verifier_lm_head.weight", "verifier_norm.weight")


def detect(d: Mapping[str, Any], where: str) -> bool:
    return "speculators_model_type" in d


# ---- reading -----------------------------------------------------------------------------------------------

def _eagle3_config(d, where, tlc, arch, spec_tokens, verifier, common):
    """-> (config, layer field, its ids, notes) of an ``eagle3`` file."""
    llama = tlc.get("model_type", "qwen3") == "llama"
    field = "eagle_aux_hidden_state_layer_ids"
    if field not in d:
        raise ConfigError(f"{where}: missing field {field!r}")
    file_ids = ids_field(d[field], field, where)
    for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        if bool_field(d, k, False, where):
            raise FormatError(f"{where}: {k}=true; DeepSpec's Eagle3 (the module here) is {k}=false")
    if arch.num_hidden_layers != 1:
        raise FormatError(f"{where}: a {arch.num_hidden_layers}-layer speculators Eagle3 feeds [emb ; hidden] "
                          "only into layer 0; DeepSpec's Eagle3 feeds it into every layer, so only 1 layer maps")
    if llama:
        for k in ("attention_bias", "mlp_bias"):
            if bool_field(tlc, k, False, f"{where} transformer_layer_config"):
                raise FormatError(f"{where}: transformer_layer_config.{k}=true; the Llama Eagle3 layer here "
                                  "(SpecForge's) has no biases")
    elif len(file_ids) != 5:
        raise FormatError(f"{where}: {field} lists {len(file_ids)} layers; DeepSpec's Eagle3 (the module here) "
                          "fuses exactly 5")
    if spec_tokens is not None and (not isinstance(spec_tokens, int) or spec_tokens < 1):
        raise ConfigError(f"{where}: speculators_config.proposal_methods[0].speculative_tokens={spec_tokens!r}")
    cfg = make_config(where, architecture=EAGLE3_ARCH, target_layer_ids=layer_ids_from(file_ids, LAYER_INPUT),
                      ttt_length=int(spec_tokens or DEFAULT_EAGLE3_TOKENS), target_model_name_or_path=verifier,
                      markov_rank=0, enable_confidence_head=False,
                      eagle3_variant=EAGLE3_LLAMA if llama else EAGLE3_DEEPSPEC, **common)
    return cfg, field, file_ids, ()


def _block_config(d, where, tlc, arch, spec_tokens, verifier, common):
    """-> (config, layer field, its ids, notes) of a ``dspark`` / ``dflash`` file."""
    alg = d["speculators_model_type"]
    field = "aux_hidden_state_layer_ids"
    for k in (field, "block_size", "mask_token_id"):
        if k not in d:
            raise ConfigError(f"{where}: missing field {k!r}")
    file_ids = ids_field(d[field], field, where)
    bs = d["block_size"]
    # absent = bonus-anchor: DSpark before speculators' 2026-07-13 change, and DFlash's default
    sfa = bool_field(d, "sample_from_anchor", False, where)
    if spec_tokens is not None and spec_tokens != (bs if sfa else bs - 1):
        raise ConfigError(
            f"{where}: sample_from_anchor={str(sfa).lower()} with block_size={bs} drafts {bs if sfa else bs - 1} "
            f"tokens per block, but speculators_config.proposal_methods[0].speculative_tokens={spec_tokens}: the "
            "slot convention flag does not match the checkpoint")
    if bool_field(d, "sliding_window_non_causal", False, where):
        raise FormatError(f"{where}: sliding_window_non_causal=true has no equivalent here")
    notes = []
    if alg == "dspark" and "sample_from_anchor" not in d:
        notes.append("no sample_from_anchor key: read as bonus-anchor (speculators DSpark before 2026-07-13)")
    if alg == "dspark":
        rank = d.get("markov_rank", 256)
        kw = dict(markov_rank=int(rank), markov_head_type=str(d.get("markov_head_type", "vanilla")),
                  enable_confidence_head=bool_field(d, "enable_confidence_head", True, where),
                  confidence_head_with_markov=bool_field(d, "confidence_head_with_markov", True, where))
    else:
        kw = dict(markov_rank=0, enable_confidence_head=False)
    common["mask_token_id"] = int(d["mask_token_id"])
    cfg = make_config(where, architecture=DSPARK_ARCH, block_size=bs if sfa else bs - 1,
                      slot_convention=ANCHOR_FIRST if sfa else BONUS_ANCHOR,
                      target_layer_ids=layer_ids_from(file_ids, LAYER_INPUT), **kw, **common)
    return cfg, field, file_ids, notes


# speculators_model_type -> (backbone model types its layer may have, config reader)
_ALGORITHMS = {"dspark": (("qwen3",), _block_config), "dflash": (("qwen3",), _block_config),
               "eagle3": (("qwen3", "llama"), _eagle3_config)}


def read(path, d, where, raw, target=None) -> DraftCheckpoint:
    alg = d.get("speculators_model_type")
    if alg not in SPECULATORS_ARCHS:
        raise FormatError(f"{where}: speculators_model_type={alg!r}; supported: {sorted(SPECULATORS_ARCHS)}")
    model_types, read_config = _ALGORITHMS[alg]
    tlc = d.get("transformer_layer_config")
    if not isinstance(tlc, dict):
        raise ConfigError(f"{where}: missing field 'transformer_layer_config'")
    sc = d.get("speculators_config") or {}
    methods = sc.get("proposal_methods") or [{}] if isinstance(sc, dict) else None
    if not isinstance(methods, list) or not isinstance(methods[0], dict):
        raise ConfigError(f"{where}: speculators_config.proposal_methods must be a list of objects")
    spec_tokens = methods[0].get("speculative_tokens")
    verifier = (sc.get("verifier") or {}).get("name_or_path")
    arch, extra = arch_config(tlc, f"{where} transformer_layer_config", {"architectures", "auto_map"},
                              model_types=model_types)
    if d.get("target_hidden_size") not in (None, arch.hidden_size):
        raise FormatError(f"{where}: target_hidden_size={d['target_hidden_size']} differs from the draft's "
                          f"hidden_size {arch.hidden_size}; drafts here fuse taps of the draft's own width")
    dtype = str(d.get("dtype") or d.get("torch_dtype") or tlc.get("dtype") or "bfloat16")
    v = arch.vocab_size
    vd = d.get("draft_vocab_size", v)
    if not isinstance(vd, int) or not 0 < vd <= v:
        raise ConfigError(f"{where}: draft_vocab_size={vd!r} must be an integer in [1, vocab_size={v}]")
    draft_vocab = read_vocab_tables(where, raw, v, vd)
    common = dict(mask_token_id=0, num_anchors=DEFAULT_NUM_ANCHORS, num_draft_layers=arch.num_hidden_layers,
                  arch=arch, extra_json=extra, dtype=dtype, draft_vocab=draft_vocab)
    cfg, field, file_ids, notes = read_config(d, where, tlc, arch, spec_tokens, verifier, common)
    tensors = {k: handle_lazy(h) for k, h in raw.items() if k not in ("d2t", "t2d", *_DROPPED_ON_READ)}
    check_tensors(where, cfg, raw, field, file_ids,
                  {"embed_tokens.weight": v, "lm_head.weight": vd,
                   **({"markov_head.markov_w1.weight": v, "markov_head.markov_w2.weight": vd}
                      if cfg.has_markov else {})})
    if cfg.draft_vocab is not None:
        if "lm_head.weight" not in tensors:
            raise CheckpointError(f"{where}: a pruned-vocab checkpoint (draft_vocab_size={vd}) must store lm_head")
        for k in ("lm_head.weight", "markov_head.markov_w2.weight"):
            if k in tensors:
                tensors[k] = scatter(tensors[k], cfg.draft_vocab, v)
    return finish_shared(path, NAME, d, where, raw, cfg, field, file_ids, LAYER_INPUT, verifier=verifier,
                         draft_vocab_rows=vd, tensors=tensors, notes=notes)


# ---- writing -----------------------------------------------------------------------------------------------

def _plan_block(cfg: DraftConfig, alg: str) -> str:
    if alg == "dflash" and cfg.slot_convention == ANCHOR_FIRST:
        # vLLM's speculators translator drops sample_from_anchor for "dflash" and runs it bonus-anchor, one
        # position early and silently; as a "dspark" with markov_rank 0 the flag is honoured (DRAFT_FORMATS R3)
        return "dspark"
    return alg


def _plan_eagle3(cfg: DraftConfig, alg: str) -> str:
    if cfg.num_draft_layers != 1:
        refuse(NAME, f"a {cfg.num_draft_layers}-layer DeepSpec Eagle3 feeds [emb ; hidden] into every layer; "
                     "speculators/vLLM Eagle3 feed it only into layer 0")
    return alg


def _block_fields(cfg: DraftConfig, alg: str, verifier) -> tuple[int, Any, dict]:
    """-> (speculative tokens, verifier, the kind's top-level keys) of a block draft."""
    d = dict(block_size=cfg.num_block_slots, mask_token_id=cfg.mask_token_id,
             aux_hidden_state_layer_ids=list(cfg.layer_ids(LAYER_INPUT)),
             sample_from_anchor=cfg.slot_convention == ANCHOR_FIRST, sliding_window_non_causal=False)
    if alg == "dspark":
        d.update(markov_rank=cfg.markov_rank, markov_head_type=cfg.markov_head_type,
                 enable_confidence_head=cfg.enable_confidence_head,
                 confidence_head_with_markov=cfg.confidence_head_with_markov)
    return cfg.block_size, verifier, d


def _eagle3_fields(cfg: DraftConfig, alg: str, verifier) -> tuple[int, Any, dict]:
    """-> (speculative tokens, verifier, the kind's top-level keys) of an Eagle3 draft."""
    d = dict(eagle_aux_hidden_state_layer_ids=list(cfg.layer_ids(LAYER_INPUT)), norm_before_residual=False,
             norm_before_fc=False, fc_norm=False, norm_output=False, embed_requires_grad=False)
    return cfg.ttt_length, verifier if verifier is not None else cfg.target_model_name_or_path, d


# per draft kind: the algorithm it is written as (or a refusal), and its top-level config keys
_PLANS = {BLOCK: _plan_block, EAGLE3: _plan_eagle3}
_FIELDS = {BLOCK: _block_fields, EAGLE3: _eagle3_fields}


def plan(cfg: DraftConfig, pruned: bool, allow_nonstandard: bool) -> str:
    kind = draft_family(cfg).kind
    return _PLANS[kind](cfg, kind.algorithm(cfg))


def speculators_config(cfg: DraftConfig, alg: str, verifier, verifier_archs, vd: int | None) -> dict:
    tlc = backbone_dict(cfg)
    for k in ("architectures", "dtype", "transformers_version"):
        tlc.pop(k, None)
    if cfg.eagle3_variant == EAGLE3_LLAMA:      # (an Eagle3 config only, DraftConfig.validate)
        tlc = llama_backbone(cfg, tlc)         # vLLM: model_type llama -> Eagle3LlamaForCausalLM (no q/k norms)
    tokens, verifier, fields = _FIELDS[draft_family(cfg).kind](cfg, alg, verifier)
    d: dict[str, Any] = {"architectures": [SPECULATORS_ARCHS[alg]], "speculators_model_type": alg,
                         "speculators_version": SPECULATORS_VERSION, "draft_vocab_size": vd or cfg.arch.vocab_size,
                         "target_hidden_size": None, "tie_word_embeddings": False}
    d.update(fields)
    d["transformer_layer_config"] = tlc
    d["speculators_config"] = {
        "algorithm": alg, "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens, "accept_tolerance": 0.0,
                              "verifier_accept_k": 1}],
        "verifier": {"name_or_path": verifier, "architectures": list(verifier_archs)}}
    return d


def write(draft, path: str, alg: str, keep, options: ExportOptions) -> str:
    """The LM head (and the Markov head's output rows) cut to ``keep`` with ``d2t``/``t2d``, when pruned."""
    cfg = draft.config
    dt = out_dtype(draft, options)
    tensors = deepspec_tensors(draft, dt)
    config = speculators_config(cfg, alg, options.verifier, options.verifier_architectures,
                                len(keep) if keep is not None else None)
    if keep is not None:
        idx = np.asarray(keep, np.int64)
        tensors["lm_head.weight"] = np.ascontiguousarray(tensors["lm_head.weight"][idx])
        if "markov_head.markov_w2.weight" in tensors:
            tensors["markov_head.markov_w2.weight"] = np.ascontiguousarray(
                tensors["markov_head.markov_w2.weight"][idx])
        tensors["d2t"], tensors["t2d"] = vocab_tables(idx, cfg.arch.vocab_size)
    return write_dir(draft, path, tensors, config, dt, options.max_shard_bytes)


FORMAT = DraftFormat(NAME, detect, read, plan, lambda cfg: True, write)
