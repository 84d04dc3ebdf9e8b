"""dspark-jax: DSpark speculative decoding in JAX/Flax.

Public API (stable names, see docs/DESIGN.md §4)::

    import dspark_jax as dj
    target = dj.load_target("hf_dir", dtype="float32")
    dj.save_target(target, "out_dir")
    out = dj.generate(target, prompts, max_new_tokens=256, temperature=0.0, seed=0)
    draft = dj.build_draft(target, dj.DraftConfig(...))
    draft = dj.load_draft("deepspec_draft_dir");  dj.save_draft(draft, "out_dir")
    outs = draft.train_forward(input_ids, loss_mask, target_hidden, target_last_hidden, anchors, block_keep)
    loss, metrics = dj.dspark_loss(outs, draft.config)
"""

import os as _os

# transformers serves us tokenizers and chat templates only; without torch installed (the runtime dependencies do
# not need it) it advises on every import that its models are unavailable. Quiet unless the user chose otherwise.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from dspark_jax.config import ConfigError, RopeConfig, TargetConfig  # noqa: E402
from dspark_jax.convert.deepspec import load_draft, save_draft  # noqa: E402
from dspark_jax.convert.hf import load_target, save_target  # noqa: E402
from dspark_jax.convert.safetensors_io import CheckpointError  # noqa: E402
from dspark_jax.decode.autoregressive import generate, generate_stream  # noqa: E402
from dspark_jax.decode.output import GenerationOutput  # noqa: E402
from dspark_jax.decode.sampling import SamplingConfig  # noqa: E402
from dspark_jax.decode.speculative import speculative_generate  # noqa: E402
from dspark_jax.drafts.build import build_draft  # noqa: E402
from dspark_jax.drafts.config import DraftConfig  # noqa: E402
from dspark_jax.targets.registry import build_target  # noqa: E402
from dspark_jax.train.anchors import sample_anchors  # noqa: E402
from dspark_jax.train.eagle3_loss import eagle3_loss  # noqa: E402
from dspark_jax.train.loss import dspark_loss  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "load_target", "save_target", "generate", "generate_stream", "speculative_generate", "build_target",
    "build_draft", "load_draft", "save_draft", "dspark_loss", "eagle3_loss", "sample_anchors",
    "TargetConfig", "DraftConfig", "RopeConfig", "SamplingConfig", "GenerationOutput", "ConfigError",
    "CheckpointError",
]
