"""DraftConfig: DeepSpec's draft ``config.json`` (a deep copy of the target config plus DSpark keys).

The architecture fields (hidden size, heads, RoPE, ...) are held as a :class:`TargetConfig` in ``arch``
with ``num_hidden_layers`` = the number of draft layers. Unknown target keys DeepSpec carries along
(``max_window_layers``, ...) are kept verbatim in ``extra_json`` so a loaded config is written back
unchanged. Loss weights are training settings: DeepSpec keeps them out of config.json, and so do we.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from dspark_jax.config import ConfigError, TargetConfig, read_config_json
from dspark_jax.drafts.gemma4_config import (  # noqa: F401  (the Gemma4 drafts' names, also importable from here)
    GEMMA4_ARCHITECTURES,
    GEMMA4_DSPARK_ARCH,
    GEMMA4_EAGLE3_ARCH,
    gemma4_draft_config_to_hf,
    gemma4_draft_fields_from_hf,
)

DSPARK_ARCH = "Qwen3DSparkModel"
EAGLE3_ARCH = "Qwen3Eagle3Model"
ARCHITECTURES = (DSPARK_ARCH, EAGLE3_ARCH, *GEMMA4_ARCHITECTURES)
# a draft config's architecture once bound to a Gemma4 target (DeepSpec names the Gemma4 drafts apart)
GEMMA4_ARCH_OF = {DSPARK_ARCH: GEMMA4_DSPARK_ARCH, EAGLE3_ARCH: GEMMA4_EAGLE3_ARCH,
                  GEMMA4_DSPARK_ARCH: GEMMA4_DSPARK_ARCH, GEMMA4_EAGLE3_ARCH: GEMMA4_EAGLE3_ARCH}
MARKOV_TYPES = ("vanilla", "gated", "rnn")
# Eagle3 layer variants (DRAFT_FORMATS §1.5 / §2.4). Both: [emb ; hidden] (2H) into q/k/v, residual on the
# un-normalised hidden, pre-norm output fed back, logits = lm_head(norm(h)).
# EAGLE3_DEEPSPEC: DeepSpec's Qwen3Eagle3Model: Qwen3 attention (q_norm/k_norm, attention_bias honoured), 5 taps.
# EAGLE3_LLAMA: SpecForge/SGLang LlamaForCausalLMEagle3 (and vLLM's Llama Eagle3): no q_norm/k_norm, q/k/v/o
# without bias, any number of taps (the SpecForge file holds 3), a pruned trained lm_head via d2t/t2d.
EAGLE3_DEEPSPEC = "deepspec"
EAGLE3_LLAMA = "llama"
EAGLE3_VARIANTS = (EAGLE3_DEEPSPEC, EAGLE3_LLAMA)

# Block slot conventions (DRAFT_FORMATS §0.2). The block is always [anchor, MASK, ...] from the anchor's position.
# ANCHOR_FIRST (DeepSpec, SpecForge DSpark, speculators sample_from_anchor=true): slot k predicts the token after
# it, so every slot drafts. BONUS_ANCHOR (z-lab, SpecForge DFlash, older speculators): slot k >= 1 predicts the
# token at its own position and slot 0 drafts nothing. Weights look the same either way, so only this flag tells.
ANCHOR_FIRST = "anchor_first"
BONUS_ANCHOR = "bonus_anchor"
SLOT_CONVENTIONS = (ANCHOR_FIRST, BONUS_ANCHOR)
# Tapped-layer id conventions (DRAFT_FORMATS §0.1). LAYER_OUTPUT (DeepSpec, z-lab, SpecForge, SGLang): id L is
# the output of decoder layer L, -1 the embeddings. LAYER_INPUT (speculators, vLLM aux ids): id L is the residual
# stream entering layer L. input id = output id + 1. ``DraftConfig.target_layer_ids`` is always LAYER_OUTPUT,
# because the target taps (and so training and decoding) take output ids; readers convert on the way in.
LAYER_OUTPUT = "output"
LAYER_INPUT = "input"


def layer_ids_to(ids, convention: str) -> tuple[int, ...]:
    """Output-convention ids -> ids as ``convention`` writes them."""
    if convention not in (LAYER_OUTPUT, LAYER_INPUT):
        raise ConfigError(f"layer id convention {convention!r} is not one of {(LAYER_OUTPUT, LAYER_INPUT)}")
    return tuple(int(i) + (convention == LAYER_INPUT) for i in ids)


def layer_ids_from(ids, convention: str) -> tuple[int, ...]:
    """Ids written in ``convention`` -> output-convention ids (what ``target_layer_ids`` holds)."""
    if convention not in (LAYER_OUTPUT, LAYER_INPUT):
        raise ConfigError(f"layer id convention {convention!r} is not one of {(LAYER_OUTPUT, LAYER_INPUT)}")
    return tuple(int(i) - (convention == LAYER_INPUT) for i in ids)

def specforge_eagle3_layer_ids(num_target_layers: int) -> tuple[int, int, int]:
    """SpecForge/SGLang's default Eagle3 taps for a ``T``-layer target, output convention: ``[1, T//2-1, T-4]``."""
    t = int(num_target_layers)
    return (1, t // 2 - 1, t - 4)


# keys DeepSpec adds to the copied target config (and which TargetConfig does not model)
_DSPARK_KEYS = ("block_size", "mask_token_id", "target_layer_ids", "num_anchors", "num_target_layers",
                "enable_confidence_head", "confidence_head_with_markov", "markov_rank", "markov_head_type")
_EAGLE3_KEYS = ("target_layer_ids", "num_target_layers", "ttt_length", "step_loss_decay",
                "draft_num_hidden_layers", "target_model_name_or_path")
# keys TargetConfig reads or that DeepSpec overrides; everything else goes to extra_json
_ARCH_KEYS = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
              "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
              "hidden_act", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
              "torch_dtype", "layer_types", "use_sliding_window", "sliding_window", "attention_dropout",
              "use_cache", "partial_rotary_factor", "transformers_version"}


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DSpark / DFlash / Eagle3 draft.

    DSpark = ``markov_rank > 0`` (+ ``enable_confidence_head``); DFlash = ``markov_rank 0`` and no
    confidence head (same architecture name); Eagle3 = ``architecture="Qwen3Eagle3Model"`` (``eagle3_variant``
    "llama" = SpecForge's Llama Eagle3 layer, without q/k norms).
    ``arch=None`` means "derive from the target" (``dj.build_draft`` fills it in).

    Conventions: ``target_layer_ids`` are layer-*output* ids (see ``layer_ids``); ``block_size`` counts drafted
    tokens per block and ``slot_convention`` says which slot drafts what (``num_block_slots`` backbone slots).
    """

    architecture: str = DSPARK_ARCH
    block_size: int = 7
    mask_token_id: int = 151669
    target_layer_ids: tuple[int, ...] = (1, 9, 17, 25, 33)
    num_anchors: int = 512
    num_target_layers: int | None = None
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    num_draft_layers: int = 5
    # Eagle3
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    target_model_name_or_path: str | None = None
    # training-only loss settings (spec §3.4); None = the variant's DeepSpec default
    loss_decay_gamma: float | None = None
    paper_loss_weights: bool = False
    ce_loss_alpha: float | None = None
    l1_loss_alpha: float | None = None
    confidence_loss_alpha: float | None = None
    arch: TargetConfig | None = None
    extra_json: str = "{}"
    dtype: str = "bfloat16"
    # ``block_size`` is the number of tokens drafted per block (what decoding, losses and calibration count);
    # the backbone runs ``num_block_slots`` slots, which is what every checkpoint's ``block_size`` field holds.
    slot_convention: str = ANCHOR_FIRST
    # pruned draft vocabulary (speculators / SpecForge d2t): ascending target ids the draft may propose; None =
    # the full vocab. Proposals renormalise over these ids; training still sees the full vocab.
    draft_vocab: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    # Eagle3 only: which Eagle3 layer (EAGLE3_VARIANTS); never written to a DeepSpec config.json
    eagle3_variant: str = EAGLE3_DEEPSPEC

    def __post_init__(self):
        if isinstance(self.target_layer_ids, list):
            object.__setattr__(self, "target_layer_ids", tuple(self.target_layer_ids))
        if self.draft_vocab is not None and not isinstance(self.draft_vocab, tuple):
            object.__setattr__(self, "draft_vocab", tuple(int(i) for i in self.draft_vocab))
        self.validate()

    # ---- variants ------------------------------------------------------------------------
    @property
    def is_eagle3(self) -> bool:
        return self.architecture in (EAGLE3_ARCH, GEMMA4_EAGLE3_ARCH)

    @property
    def family(self) -> str:
        """How the draft drafts and trains: ``"eagle3"`` (chain drafting, TTT) or ``"block"`` (DSpark / DFlash)."""
        return "eagle3" if self.is_eagle3 else "block"

    @property
    def drafts_per_round(self) -> int:
        """Drafted tokens per round: Eagle3 chains ``ttt_length`` tokens, block drafts fill ``block_size`` slots."""
        return self.ttt_length if self.is_eagle3 else self.block_size

    @property
    def has_markov(self) -> bool:
        return not self.is_eagle3 and self.markov_rank > 0

    @property
    def has_confidence(self) -> bool:
        return not self.is_eagle3 and self.enable_confidence_head

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def num_block_slots(self) -> int:
        """Backbone slots per block (anchor included): ``block_size``, +1 under the bonus-anchor convention."""
        return self.block_size + (self.slot_convention == BONUS_ANCHOR)

    @property
    def draft_vocab_size(self) -> int | None:
        return None if self.draft_vocab is None else len(self.draft_vocab)

    def layer_ids(self, convention: str = LAYER_OUTPUT) -> tuple[int, ...]:
        """``target_layer_ids`` as a format of ``convention`` writes them (input ids = output ids + 1)."""
        return layer_ids_to(self.target_layer_ids, convention)

    @property
    def loss_alphas(self) -> tuple[float, float, float]:
        """(ce, l1, confidence) weights: DSpark 0.1/0.9/1.0; DFlash (no Markov head) 1/0/0."""
        default = (0.1, 0.9, 1.0) if self.has_markov else (1.0, 0.0, 1.0 if self.has_confidence else 0.0)
        vals = (self.ce_loss_alpha, self.l1_loss_alpha, self.confidence_loss_alpha)
        out = tuple(d if v is None else float(v) for v, d in zip(vals, default))
        return out[0], out[1], out[2] if self.has_confidence else 0.0

    @property
    def gamma(self) -> float:
        if self.loss_decay_gamma is not None:
            return float(self.loss_decay_gamma)
        return float(self.block_size) if self.paper_loss_weights else 4.0

    # ---- checks --------------------------------------------------------------------------
    def validate(self, where: str = "DraftConfig") -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"{where}: architectures[0]={self.architecture!r} is not one of {ARCHITECTURES}")
        if self.block_size < 1:
            raise ConfigError(f"{where}: block_size must be >= 1, got {self.block_size}")
        ids = self.target_layer_ids
        if not ids:
            raise ConfigError(f"{where}: target_layer_ids is empty")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ConfigError(f"{where}: target_layer_ids must be strictly increasing, got {list(ids)}")
        if ids[0] < -1:
            raise ConfigError(f"{where}: target_layer_ids may not go below -1 (the embeddings), got {list(ids)}")
        if self.is_eagle3:
            if -1 in ids:
                raise ConfigError(f"{where}: Eagle3 target_layer_ids may not include -1")
            if self.eagle3_variant == EAGLE3_DEEPSPEC and len(ids) != 5:
                raise ConfigError(f"{where}: Eagle3 target_layer_ids must hold exactly 5 ids (DeepSpec), got "
                                  f"{list(ids)}")
        else:
            if self.markov_rank < 0:
                raise ConfigError(f"{where}: markov_rank must be >= 0, got {self.markov_rank}")
            if self.markov_rank and self.markov_head_type not in MARKOV_TYPES:
                raise ConfigError(f"{where}: markov_head_type={self.markov_head_type!r} is not one of {MARKOV_TYPES}")
        if self.num_draft_layers < 1:
            raise ConfigError(f"{where}: num_draft_layers must be >= 1")
        if self.eagle3_variant not in EAGLE3_VARIANTS:
            raise ConfigError(f"{where}: eagle3_variant={self.eagle3_variant!r} is not one of {EAGLE3_VARIANTS}")
        if self.eagle3_variant != EAGLE3_DEEPSPEC and self.architecture != EAGLE3_ARCH:
            raise ConfigError(f"{where}: eagle3_variant={self.eagle3_variant!r} applies to {EAGLE3_ARCH} drafts only")
        if self.slot_convention not in SLOT_CONVENTIONS:
            raise ConfigError(f"{where}: slot_convention={self.slot_convention!r} is not one of {SLOT_CONVENTIONS}")
        if self.slot_convention == BONUS_ANCHOR and self.is_eagle3:
            raise ConfigError(f"{where}: slot_convention={BONUS_ANCHOR!r} applies to block drafts, not Eagle3")
        if self.draft_vocab is not None:
            dv = self.draft_vocab
            if not dv or any(b <= a for a, b in zip(dv, dv[1:])) or dv[0] < 0:
                raise ConfigError(f"{where}: draft_vocab must be non-empty, strictly ascending target ids >= 0")
            if self.arch is not None and dv[-1] >= self.arch.vocab_size:
                raise ConfigError(f"{where}: draft_vocab holds id {dv[-1]} outside the vocab "
                                  f"[0, {self.arch.vocab_size})")
        if self.num_target_layers is not None and ids[-1] >= self.num_target_layers - 1:
            raise ConfigError(
                f"{where}: target_layer_ids {list(ids)} must stay below the target's last layer "
                f"{self.num_target_layers - 1} (num_target_layers={self.num_target_layers}; the last layer is "
                "post-norm in HF hidden_states and may not be tapped)")
        if self.arch is not None:
            if self.arch.num_hidden_layers != self.num_draft_layers:
                raise ConfigError(f"{where}: arch.num_hidden_layers={self.arch.num_hidden_layers} != "
                                  f"num_draft_layers={self.num_draft_layers}")
            if not 0 <= self.mask_token_id < self.arch.vocab_size and not self.is_eagle3:
                raise ConfigError(f"{where}: mask_token_id={self.mask_token_id} is outside the vocab "
                                  f"[0, {self.arch.vocab_size})")

    def bind(self, target) -> "DraftConfig":
        """Fills ``arch`` from the target (a deep copy with DeepSpec's overrides) and checks consistency.

        ``target`` is a :class:`TargetConfig`, or another family's config with a ``draft_backbone()`` (the Qwen3
        layer geometry its drafts use by default; then only hidden size and vocabulary must match a given ``arch``).
        """
        compared = ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim")
        if not isinstance(target, TargetConfig):
            target = target.draft_backbone()
            compared = ("hidden_size", "vocab_size")
        t = target.num_hidden_layers
        if self.target_layer_ids[-1] >= t - 1:
            raise ConfigError(f"target_layer_ids {list(self.target_layer_ids)} exceed what a {t}-layer target "
                              f"allows (ids must be < {t - 1}: the last layer may not be tapped)")
        if self.num_target_layers is not None and self.num_target_layers != t:
            raise ConfigError(f"draft num_target_layers={self.num_target_layers} but the target has {t} layers")
        arch = target.replace(num_hidden_layers=self.num_draft_layers, tie_word_embeddings=False, model_type="qwen3",
                              num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, mlp_only_layers=())
        if self.arch is not None:
            for f in compared:
                if getattr(self.arch, f) != getattr(target, f):
                    raise ConfigError(f"draft {f}={getattr(self.arch, f)} does not match the target's "
                                      f"{getattr(target, f)}")
            arch = self.arch
        return dataclasses.replace(self, arch=arch, num_target_layers=t)

    # ---- DeepSpec config.json ------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "DraftConfig":
        d = dict(d)
        if (d.get("architectures") or [None])[0] in GEMMA4_ARCHITECTURES:
            try:
                return cls(**gemma4_draft_fields_from_hf(d, where))
            except ConfigError as e:
                raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None
        archs = d.get("architectures") or []
        if not archs:
            raise ConfigError(f"{where}: missing 'architectures' (expected one of {ARCHITECTURES})")
        architecture = archs[0]
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"{where}: architectures[0]={architecture!r} is not one of {ARCHITECTURES}")
        eagle = architecture == EAGLE3_ARCH
        required = ("target_layer_ids",) if eagle else (
            "target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank")
        for k in required:
            if k not in d:
                raise ConfigError(f"{where}: missing field {k!r} (required by {architecture})")
        if not eagle and d["markov_rank"] and "markov_head_type" not in d:
            raise ConfigError(f"{where}: missing field 'markov_head_type' (markov_rank > 0)")
        arch_dict = dict(d)
        arch_dict["model_type"] = "qwen3"
        arch = TargetConfig.from_hf_dict(arch_dict, where=where)
        known = _ARCH_KEYS | set(_DSPARK_KEYS) | set(_EAGLE3_KEYS) | {"sample_from_anchor"}
        extra = {k: v for k, v in d.items() if k not in known}
        kw: dict[str, Any] = dict(architecture=architecture,
                                  target_layer_ids=tuple(int(i) for i in d["target_layer_ids"]),
                                  num_target_layers=d.get("num_target_layers"), arch=arch,
                                  num_draft_layers=arch.num_hidden_layers, extra_json=json.dumps(extra, sort_keys=True),
                                  dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"))
        if eagle:
            kw.update(ttt_length=int(d.get("ttt_length", 7)), step_loss_decay=float(d.get("step_loss_decay", 0.8)),
                      target_model_name_or_path=d.get("target_model_name_or_path"), markov_rank=0,
                      enable_confidence_head=False)
        else:
            kw.update(block_size=int(d.get("block_size", 7)), mask_token_id=int(d["mask_token_id"]),
                      num_anchors=int(d["num_anchors"]), enable_confidence_head=bool(d["enable_confidence_head"]),
                      confidence_head_with_markov=bool(d.get("confidence_head_with_markov", True)),
                      markov_rank=int(d["markov_rank"]), markov_head_type=str(d.get("markov_head_type", "vanilla")))
            # not a DeepSpec key: written (and read, as vLLM's native DSpark loader does) only for bonus-anchor
            # drafts, whose config.json block_size counts the anchor slot too
            if "sample_from_anchor" in d:
                sfa = d["sample_from_anchor"]
                if not isinstance(sfa, bool):
                    raise ConfigError(f"{where}: sample_from_anchor must be true or false, got {sfa!r}")
                if not sfa:
                    kw.update(slot_convention=BONUS_ANCHOR, block_size=kw["block_size"] - 1)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(str(e).replace("DraftConfig", where, 1)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DraftConfig":
        d, where = read_config_json(path)
        return cls.from_hf_dict(d, where=where)

    def to_hf_dict(self) -> dict[str, Any]:
        if self.arch is None:
            raise ConfigError("DraftConfig.arch is unset: bind it to a target first (dj.build_draft does)")
        if self.architecture in GEMMA4_ARCHITECTURES:
            if self.slot_convention != ANCHOR_FIRST or self.draft_vocab is not None:
                raise ConfigError("a Gemma4DSparkModel config.json holds anchor-first, full-vocab drafts only")
            return gemma4_draft_config_to_hf(self)
        if self.eagle3_variant != EAGLE3_DEEPSPEC:
            raise ConfigError("a DeepSpec config.json cannot hold a Llama-style Eagle3 draft (no q_norm/k_norm; "
                              "DeepSpec's Qwen3Eagle3Model has them): write it as SpecForge "
                              "(LlamaForCausalLMEagle3) or speculators (dspark convert draft --to ...)")
        d = self.arch.to_hf_dict()
        d.update(json.loads(self.extra_json))
        d["architectures"] = [self.architecture]
        d["model_type"] = "qwen3"
        d["num_hidden_layers"] = self.num_draft_layers
        d["layer_types"] = ["full_attention"] * self.num_draft_layers
        d["tie_word_embeddings"] = False
        d["dtype"] = self.dtype
        if self.num_target_layers is not None:
            d["num_target_layers"] = self.num_target_layers
        d["target_layer_ids"] = list(self.target_layer_ids)
        d.update(self.family_fields())
        return d

    def family_fields(self) -> dict[str, Any]:
        """The config.json keys of the draft's family, as DeepSpec names them (Eagle3: TTT; block drafts: block,
        mask, anchors and heads)."""
        if self.is_eagle3:
            d: dict[str, Any] = dict(ttt_length=self.ttt_length, step_loss_decay=self.step_loss_decay,
                                     draft_num_hidden_layers=self.num_draft_layers)
            if self.target_model_name_or_path is not None:
                d["target_model_name_or_path"] = self.target_model_name_or_path
            return d
        if self.draft_vocab is not None:
            raise ConfigError("a DeepSpec config.json cannot hold a pruned draft vocabulary (draft_vocab); write "
                              "the draft in the speculators format (dspark convert draft --to speculators)")
        d = dict(block_size=self.num_block_slots, mask_token_id=self.mask_token_id, num_anchors=self.num_anchors,
                 enable_confidence_head=self.enable_confidence_head, markov_rank=self.markov_rank)
        if self.slot_convention == BONUS_ANCHOR:
            d["sample_from_anchor"] = False
        if self.enable_confidence_head:
            d["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank:
            d["markov_head_type"] = self.markov_head_type
        return d

    def replace(self, **changes) -> "DraftConfig":
        return dataclasses.replace(self, **changes)
