"""Key maps between PyTorch checkpoints and our nnx parameter paths, as data.

A template holds ``{name}`` placeholders; what each may match comes from the rule's own ``choices`` (names only
its table uses), else from the shared ``CHOICES``. ``kind`` says how a tensor changes on the way in (the way out
is the inverse):

- ``copy``: unchanged.
- ``transpose``: a torch Linear weight ``[out, in]`` becomes an nnx kernel ``[in, out]``.
- ``expert``: one expert's Linear weight ``[out, in]``, stacked at index ``{expert}`` of an ``[E, in, out]`` param.
- ``fused_gate_up`` (load only): transformers' in-memory ``gate_up_proj [E, 2I, H]`` -> gate and up ``[E, H, I]``.
- ``fused_down`` (load only): ``down_proj [E, H, I]`` -> ``[E, I, H]``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

# template names several tables share; a table's own names ride on its rules (``with_choices``)
CHOICES = {
    "layer": r"\d+",
    "expert": r"\d+",
    "attn_proj": r"q_proj|k_proj|v_proj|o_proj",
    "qk_norm": r"q_norm|k_norm",
    "mlp_proj": r"gate_proj|up_proj|down_proj",
    "layer_norm": r"input_layernorm|post_attention_layernorm",
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    torch: str          # checkpoint key template
    nnx: str            # nnx state path template (dot-separated)
    kind: str = "copy"
    save: bool = True   # False: accepted on load, never written
    # (name, regex) pairs for template names this rule's table defines itself; they take precedence over CHOICES
    choices: tuple[tuple[str, str], ...] = ()

    def torch_regex(self) -> re.Pattern:
        return _compile(self.torch, dict(self.choices))

    def nnx_regex(self) -> re.Pattern:
        return _compile(self.nnx, dict(self.choices))


def with_choices(rules, choices: Mapping[str, str]) -> tuple[KeyRule, ...]:
    """``rules`` carrying ``choices`` (template name -> regex) as their own, beside what they already carry."""
    return tuple(dataclasses.replace(r, choices=tuple(sorted({**dict(r.choices), **choices}.items())))
                 for r in rules)


def _compile(template: str, own: Mapping[str, str]) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P<{name}>{own[name] if name in own else CHOICES[name]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


QWEN3_TARGET_RULES: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "embed_tokens.embedding"),
    KeyRule("model.norm.weight", "norm.weight"),
    KeyRule("lm_head.weight", "lm_head.kernel", "transpose"),
    KeyRule("model.layers.{layer}.{layer_norm}.weight", "layers.{layer}.{layer_norm}.weight"),
    KeyRule("model.layers.{layer}.self_attn.{attn_proj}.weight", "layers.{layer}.self_attn.{attn_proj}.kernel",
            "transpose"),
    KeyRule("model.layers.{layer}.self_attn.{attn_proj}.bias", "layers.{layer}.self_attn.{attn_proj}.bias"),
    KeyRule("model.layers.{layer}.self_attn.{qk_norm}.weight", "layers.{layer}.self_attn.{qk_norm}.weight"),
    KeyRule("model.layers.{layer}.mlp.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}.kernel", "transpose"),
    KeyRule("model.layers.{layer}.mlp.gate.weight", "layers.{layer}.mlp.router.kernel", "transpose"),
    KeyRule("model.layers.{layer}.mlp.experts.{expert}.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}",
            "expert"),
    KeyRule("model.layers.{layer}.mlp.experts.gate_up_proj", "layers.{layer}.mlp.gate_proj|up_proj",
            "fused_gate_up", save=False),
    KeyRule("model.layers.{layer}.mlp.experts.down_proj", "layers.{layer}.mlp.down_proj", "fused_down",
            save=False),
)

# Buffers some checkpoints carry that are recomputed here.
QWEN3_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


# draft-only template names (the Gemma4 draft table reuses the head rules, and their names travel with them)
_EAGLE_NORM = {"eagle_norm": r"input_layernorm|post_attention_layernorm|hidden_norm"}
_MARKOV = {"markov_w": r"markov_w1|markov_w2", "markov_proj": r"gate_proj|joint_proj"}


def _draft_layer_rules(norm_choice: str) -> tuple[KeyRule, ...]:
    return (
        KeyRule(f"layers.{{layer}}.{{{norm_choice}}}.weight", f"layers.{{layer}}.{{{norm_choice}}}.weight"),
        KeyRule("layers.{layer}.self_attn.{attn_proj}.weight", "layers.{layer}.self_attn.{attn_proj}.kernel",
                "transpose"),
        KeyRule("layers.{layer}.self_attn.{attn_proj}.bias", "layers.{layer}.self_attn.{attn_proj}.bias"),
        KeyRule("layers.{layer}.self_attn.{qk_norm}.weight", "layers.{layer}.self_attn.{qk_norm}.weight"),
        KeyRule("layers.{layer}.mlp.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}.kernel", "transpose"),
    )


# DeepSpec draft checkpoints (spec §1.9): no "model." prefix; embed_tokens / lm_head stored [V, H].
DEEPSPEC_DSPARK_RULES: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "embed_tokens"),
    KeyRule("lm_head.weight", "lm_head"),
    KeyRule("fc.weight", "fc.kernel", "transpose"),
    KeyRule("hidden_norm.weight", "hidden_norm.weight"),
    KeyRule("norm.weight", "norm.weight"),
    *_draft_layer_rules("layer_norm"),
    *with_choices((
        KeyRule("markov_head.{markov_w}.weight", "markov_head.{markov_w}"),
        KeyRule("markov_head.{markov_proj}.weight", "markov_head.{markov_proj}.kernel", "transpose"),
        KeyRule("markov_head.{markov_proj}.bias", "markov_head.{markov_proj}.bias"),
    ), _MARKOV),
    KeyRule("confidence_head.proj.weight", "confidence_head.proj.kernel", "transpose"),
    KeyRule("confidence_head.proj.bias", "confidence_head.proj.bias"),
)

DEEPSPEC_EAGLE3_RULES: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "embed_tokens"),
    KeyRule("lm_head.weight", "lm_head"),
    KeyRule("fc.weight", "fc.kernel", "transpose"),
    KeyRule("norm.weight", "norm.weight"),
    *with_choices(_draft_layer_rules("eagle_norm"), _EAGLE_NORM),
)

# torch.compile wraps modules as "_orig_mod."; DeepSpec strips it on save, we strip it on load too.
DEEPSPEC_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)
