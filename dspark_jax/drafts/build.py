"""``dj.build_draft``: a fresh draft for a target, with the target's embedding and LM head copied in, frozen."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.dspark import DSparkDraft
from dspark_jax.drafts.eagle3 import Eagle3Draft
from dspark_jax.drafts.gemma4 import Gemma4DSparkDraft, Gemma4Eagle3Draft, bind_gemma4
from dspark_jax.targets.gemma4_config import Gemma4Config

DRAFT_CLASSES = {arch: cls for cls in (DSparkDraft, Eagle3Draft, Gemma4DSparkDraft, Gemma4Eagle3Draft)
                 for arch in cls.architectures}
"""A bound draft config's ``architecture`` -> the draft family's class."""


def draft_class(config: DraftConfig):
    """The class that builds a bound ``config``'s draft."""
    return DRAFT_CLASSES[config.architecture]


def build_draft(target, config: DraftConfig, *, seed: int = 0, dtype=None, param_dtype=None,
                attention_impl: str = "auto"):
    """Makes a draft for ``target``: config bound to the target (architecture deep-copied, checked), weights
    initialised as spec §1.8 (N(0, initializer_range), zero biases, unit norms), then ``embed_tokens`` and
    ``lm_head`` overwritten with copies of the target's (``Frozen``: never trained).

    ``dtype`` is the compute dtype (default: the target's); ``param_dtype`` the storage dtype of every weight
    (default: ``dtype``). Training in bf16 with an fp32 master copy is ``dtype="bfloat16",
    param_dtype="float32"``: the optimizer updates fp32 weights and each matmul casts them to bf16."""
    if not isinstance(config, DraftConfig):
        raise TypeError(f"config must be a DraftConfig, got {type(config).__name__}")
    cfg = bind_gemma4(config, target.config) if isinstance(target.config, Gemma4Config) else config.bind(target.config)
    cls = draft_class(cfg)
    draft = cls(cfg, dtype=dtype or target.dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                rngs=nnx.Rngs(seed))
    embed = target.embed_tokens.embedding[...]
    head = embed if target.lm_head is None else target.lm_head.kernel[...].T
    draft.embed_tokens[...] = jnp.array(embed, dtype=draft.embed_tokens[...].dtype)
    draft.lm_head[...] = jnp.array(head, dtype=draft.lm_head[...].dtype)
    return draft
