"""Training a draft for a Gemma4 target: the gemma4-12b presets mirror DeepSpec's configs, and the trainer runs a
DSpark draft against a tiny Gemma4 checkpoint (gemma4 chat template, softcapped logits through the vocab-chunked
loss) and exports a Gemma4DSparkModel."""

import json
import os

import pytest

import dspark_jax as dj
from dspark_jax.targets.gemma4_config import Gemma4Config
from dspark_jax.train.config import list_presets, load_train_config


def test_gemma4_presets_mirror_deepspec():
    assert {"gemma4-12b-dspark", "gemma4-12b-dflash", "gemma4-12b-eagle3"} <= set(list_presets())
    c = load_train_config("gemma4-12b-dspark")
    assert (c.draft.target_layer_ids, c.draft.mask_token_id, c.data.chat_template) == ((5, 17, 29, 41, 46), 4, "gemma4")
    assert (c.draft.block_size, c.draft.num_draft_layers, c.draft.num_anchors, c.draft.markov_rank) == (7, 5, 512, 256)
    assert (c.optim.lr, c.optim.warmup_ratio, c.optim.epochs, c.optim.global_batch_size, c.optim.seed) == (
        6e-4, 0.04, 10, 512, 42)
    # the chunked loss applies the softcap: the Qwen3 presets' chunk, no materialised [.., 262144] logits
    assert c.optim.vocab_chunk == load_train_config("qwen3-4b-dspark").optim.vocab_chunk == 8192
    d = load_train_config("gemma4-12b-dflash")
    assert d.draft.markov_rank == 0 and not d.draft.enable_confidence_head
    e = load_train_config("gemma4-12b-eagle3")
    assert e.draft.kind == "eagle3" and e.draft.num_draft_layers == 1 and e.optim.seed == 0


def test_trainer_runs_a_dspark_draft_for_a_gemma4_target(tmp_path):
    pytest.importorskip("tokenizers")
    from test_data import GEMMA4_TEMPLATE, _make_tokenizer, _tiny_backend
    from test_trainer import FAST_COMPILE, one_device, with_target

    from dspark_jax.train.trainer import EMBEDDED, Trainer

    tok = _make_tokenizer(_tiny_backend(), GEMMA4_TEMPLATE, ["<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"],
                          bos_token="<bos>")
    v = len(tok) + 1                                 # one spare id for the mask token
    target = dj.build_target(Gemma4Config(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=("sliding_attention", "full_attention") * 2, sliding_window=16, final_logit_softcapping=30.0,
        eos_token_id=None))
    target.attach_tokenizer(tok)
    dj.save_target(target, tmp_path / "target")
    data = tmp_path / "train.jsonl"
    with open(EMBEDDED["embedded:tiny"]) as f:
        data.write_text("".join(next(f) for _ in range(8)))
    cfg = load_train_config("tiny", with_target(tmp_path / "target", tmp_path / "run", data, **{
        "data.chat_template": "gemma4", "optim.vocab_chunk": 16, "optim.max_steps": 1, "optim.precision": "fp32",
        "draft.mask_token_id": v - 1}))
    result = Trainer(cfg, devices=one_device(), compiler_options=FAST_COMPILE).run()
    assert result.steps == 1 and all(h["loss"] == h["loss"] for h in result.history)
    exported = json.loads((tmp_path / "run" / "draft" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4DSparkModel"]
    draft = dj.load_draft(tmp_path / "run" / "draft")
    assert type(draft).__name__ == "Gemma4DSparkDraft" and os.path.isdir(tmp_path / "target")
