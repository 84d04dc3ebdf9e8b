"""DeepSpec draft checkpoints: exact key set (spec §1.9), bit-identical round trips, strict errors."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import dspark_jax as dj
from dspark_jax.config import TargetConfig

V, H, NH, NKV, HD, I, R = 32, 16, 2, 1, 8, 32, 4


@pytest.fixture(scope="module")
def target():
    return dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                        num_hidden_layers=4, num_attention_heads=NH, num_key_value_heads=NKV,
                                        head_dim=HD, initializer_range=0.2))


def _draft(target, **kw):
    base = dict(block_size=4, mask_token_id=31, target_layer_ids=(0, 1, 2), num_anchors=3, markov_rank=R,
                num_draft_layers=2)
    base.update(kw)
    return dj.build_draft(target, dj.DraftConfig(**base), seed=7)


def _expected_keys(kind: str | None, confidence: bool, layers=2, taps=3) -> dict:
    """Spec §1.9's table for the tiny config."""
    keys = {"embed_tokens.weight": (V, H), "fc.weight": (H, taps * H), "hidden_norm.weight": (H,),
            "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(layers):
        p = f"layers.{i}."
        keys.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                     p + "self_attn.q_proj.weight": (NH * HD, H), p + "self_attn.k_proj.weight": (NKV * HD, H),
                     p + "self_attn.v_proj.weight": (NKV * HD, H), p + "self_attn.o_proj.weight": (H, NH * HD),
                     p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,),
                     p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                     p + "mlp.down_proj.weight": (H, I)})
    if kind:
        keys["markov_head.markov_w1.weight"] = (V, R)
        keys["markov_head.markov_w2.weight"] = (V, R)
        if kind == "gated":
            keys.update({"markov_head.gate_proj.weight": (R, H + R), "markov_head.gate_proj.bias": (R,)})
        if kind == "rnn":
            keys.update({"markov_head.joint_proj.weight": (3 * R, 2 * R + H), "markov_head.joint_proj.bias": (3 * R,)})
    if confidence:
        keys.update({"confidence_head.proj.weight": (1, H + (R if kind else 0)), "confidence_head.proj.bias": (1,)})
    return keys


def _listing(path):
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _leaves_equal(a, b):
    sa, sb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    da = {p: v.get_value() for p, v in sa}
    db = {p: v.get_value() for p, v in sb}
    assert da.keys() == db.keys()
    for p in da:
        assert da[p].dtype == db[p].dtype, p
        np.testing.assert_array_equal(np.asarray(da[p]), np.asarray(db[p]), err_msg=str(p))


VARIANTS = [("vanilla", True), ("gated", True), ("rnn", True), (None, False), ("vanilla", False)]


@pytest.mark.parametrize("kind,confidence", VARIANTS)
def test_saved_key_set_is_deepspecs(target, tmp_path, kind, confidence):
    kw = dict(markov_head_type=kind or "vanilla", markov_rank=R if kind else 0, enable_confidence_head=confidence)
    draft = _draft(target, **kw)
    dj.save_draft(draft, tmp_path)
    assert _listing(tmp_path) == _expected_keys(kind, confidence)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["num_hidden_layers"] == 2 and cfg["num_target_layers"] == 4 and cfg["tie_word_embeddings"] is False
    assert cfg["target_layer_ids"] == [0, 1, 2] and cfg["markov_rank"] == (R if kind else 0)
    assert ("markov_head_type" in cfg) == bool(kind)
    assert ("confidence_head_with_markov" in cfg) == confidence


@pytest.mark.parametrize("kind,confidence", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_save_load_bit_identical(target, tmp_path, kind, confidence, dtype):
    draft = _draft(target, markov_head_type=kind or "vanilla", markov_rank=R if kind else 0,
                   enable_confidence_head=confidence)
    dj.save_draft(draft, tmp_path / "a")
    first = dj.load_draft(tmp_path / "a", dtype=dtype)
    dj.save_draft(first, tmp_path / "b")
    second = dj.load_draft(tmp_path / "b")          # dtype from config.json
    assert second.dtype == first.dtype == np.dtype(dtype)
    _leaves_equal(first, second)
    assert json.load(open(tmp_path / "a" / "config.json")) | {"dtype": dtype} == json.load(
        open(tmp_path / "b" / "config.json"))
    if dtype == "float32":
        _leaves_equal(draft, first)


def test_frozen_copies_of_target_embeddings(target):
    draft = _draft(target)
    np.testing.assert_array_equal(np.asarray(draft.embed_tokens[...]), np.asarray(target.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(np.asarray(draft.lm_head[...]), np.asarray(target.lm_head.kernel[...]).T)
    trainable = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(draft, nnx.Param))]
    assert trainable and not any(p.startswith(("embed_tokens", "lm_head")) for p in trainable)


def test_unknown_config_fields_survive_a_round_trip(target, tmp_path):
    dj.save_draft(_draft(target), tmp_path / "a")
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    cfg["max_window_layers"] = 28
    cfg["some_future_key"] = {"x": 1}
    json.dump(cfg, open(tmp_path / "a" / "config.json", "w"))
    dj.save_draft(dj.load_draft(tmp_path / "a"), tmp_path / "b")
    out = json.load(open(tmp_path / "b" / "config.json"))
    assert out["max_window_layers"] == 28 and out["some_future_key"] == {"x": 1}


def test_torch_compile_prefix_is_stripped(target, tmp_path):
    draft = _draft(target)
    dj.save_draft(draft, tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "numpy") as f:
        tensors = {"_orig_mod." + k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    _leaves_equal(draft, dj.load_draft(tmp_path, dtype="float32"))


def _rewrite(path, drop=(), add=None):
    f = os.path.join(path, "model.safetensors")
    with safe_open(f, "numpy") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, f)


def test_missing_markov_weights_is_a_clear_error(target, tmp_path):
    dj.save_draft(_draft(target), tmp_path)
    _rewrite(tmp_path, drop=("markov_head.markov_w1.weight", "markov_head.markov_w2.weight"))
    with pytest.raises(dj.CheckpointError, match=r"missing key.*markov_head\.markov_w1\.weight"):
        dj.load_draft(tmp_path)


def test_wrong_shape_and_unexpected_keys(target, tmp_path):
    dj.save_draft(_draft(target), tmp_path)
    _rewrite(tmp_path, add={"fc.weight": np.zeros((H, 2 * H), np.float32)})
    with pytest.raises(dj.CheckpointError, match=r"fc\.weight.*\(16, 32\).*\(16, 48\)"):
        dj.load_draft(tmp_path)
    dj.save_draft(_draft(target), tmp_path)
    _rewrite(tmp_path, add={"markov_head.extra.weight": np.zeros((2,), np.float32)})
    with pytest.raises(dj.CheckpointError, match="unexpected key.*markov_head.extra.weight"):
        dj.load_draft(tmp_path)


def test_tap_width_mismatch_between_config_and_tensors(target, tmp_path):
    """The silent failure users hit elsewhere: a config with the wrong number of taps must not load."""
    dj.save_draft(_draft(target), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["target_layer_ids"] = [0, 1]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(dj.CheckpointError, match="fc.weight"):
        dj.load_draft(tmp_path)


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures"),
    (lambda c: c.pop("mask_token_id"), "mask_token_id"),
    (lambda c: c.pop("markov_head_type"), "markov_head_type"),
    (lambda c: c.update(mask_token_id=V + 5), "mask_token_id"),
    (lambda c: c.update(target_layer_ids=[2, 1, 0]), "strictly increasing"),
    (lambda c: c.update(target_layer_ids=[0, 1, 3]), "last layer"),
    (lambda c: c.update(markov_head_type="lstm"), "markov_head_type"),
])
def test_bad_draft_config(target, tmp_path, mutate, match):
    dj.save_draft(_draft(target), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    mutate(cfg)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(dj.ConfigError, match=match):
        dj.load_draft(tmp_path)


def test_build_draft_rejects_configs_that_do_not_fit_the_target(target):
    with pytest.raises(dj.ConfigError, match="target_layer_ids"):
        dj.build_draft(target, dj.DraftConfig(target_layer_ids=(0, 1, 3), mask_token_id=31, markov_rank=R))
    with pytest.raises(dj.ConfigError, match="mask_token_id"):
        dj.build_draft(target, dj.DraftConfig(target_layer_ids=(0, 1), mask_token_id=V, markov_rank=R))
    with pytest.raises(FileNotFoundError):
        dj.load_draft("/nonexistent/draft")


def test_loaded_draft_runs_like_the_original(target, tmp_path):
    draft = _draft(target, markov_head_type="rnn")
    dj.save_draft(draft, tmp_path)
    loaded = dj.load_draft(tmp_path, dtype="float32")
    ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, 31, (1, 10)))
    feats = target(ids, tap_layer_ids=(0, 1, 2))
    lm = jax.numpy.ones((1, 10), bool)
    anchors, keep = dj.sample_anchors(lm, 3, jax.random.key(0))
    a = draft.train_forward(ids, lm, feats.taps, feats.last_hidden, anchors, keep)
    b = loaded.train_forward(ids, lm, feats.taps, feats.last_hidden, anchors, keep)
    np.testing.assert_array_equal(np.asarray(a.draft_logits), np.asarray(b.draft_logits))
    np.testing.assert_array_equal(np.asarray(a.confidence_logits), np.asarray(b.confidence_logits))
