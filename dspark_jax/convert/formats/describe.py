"""What ``dspark inspect`` prints: a read checkpoint's format, algorithm, conventions, shapes and fit."""

from __future__ import annotations

from typing import Any

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.convert.families import draft_family
from dspark_jax.convert.formats.common import FORMAT_LABELS, DraftCheckpoint
from dspark_jax.convert.formats.load import check_fits
from dspark_jax.drafts.config import ANCHOR_FIRST, EAGLE3_LLAMA


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
    out.update(draft_family(cfg).kind.describe(cfg))
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
