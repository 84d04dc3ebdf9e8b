"""Key maps between PyTorch checkpoints and our nnx parameter paths, as data.

A template holds ``{name}`` placeholders; ``CHOICES`` restricts what each may match. ``kind`` says how a
tensor changes on the way in (the way out is the inverse):

- ``copy``: unchanged.
- ``transpose``: a torch Linear weight ``[out, in]`` becomes an nnx kernel ``[in, out]``.
- ``expert``: one expert's Linear weight ``[out, in]``, stacked at index ``{expert}`` of an ``[E, in, out]`` param.
- ``fused_gate_up`` (load only): transformers' in-memory ``gate_up_proj [E, 2I, H]`` -> gate and up ``[E, H, I]``.
- ``fused_down`` (load only): ``down_proj [E, H, I]`` -> ``[E, I, H]``.
"""

from __future__ import annotations

import dataclasses
import re

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

    def torch_regex(self) -> re.Pattern:
        return _compile(self.torch)

    def nnx_regex(self) -> re.Pattern:
        return _compile(self.nnx)


def _compile(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P<{name}>{CHOICES[name]})")
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
