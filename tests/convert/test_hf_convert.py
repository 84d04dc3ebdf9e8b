"""HF checkpoint <-> nnx target conversion: round trips, transformers interop, shards, fused experts, bad input,
and loading straight onto a device mesh."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import dspark_jax as dj
from dspark_jax.sharding import LogicalRules, make_mesh, sharding_fn

torch = pytest.importorskip("torch", reason="torch (test extra) runs the transformers reference models")

KINDS = ("dense", "odd", "moe")
TOL = 1e-5


# ---- helpers ----------------------------------------------------------------------------------

def _ids(batch=2, seq=7, vocab=96, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def _hf_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids)).logits.float().numpy()


def _our_logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)).logits, np.float32)


def _params(model) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_params_identical(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])), k


def _checkpoint_keys(directory) -> dict[str, tuple]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "numpy") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(directory, edit):
    """Rewrites ``model.safetensors`` in place with ``edit(dict_of_arrays)``."""
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, edit):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


# ---- interop with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_save_is_what_transformers_writes_and_reads(kind, hf_models, jax_targets, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, hf_model = hf_models[kind]
    ours = jax_targets[kind]
    ids = _ids()
    want = _hf_logits(hf_model, ids)
    np.testing.assert_allclose(_our_logits(ours, ids), want, atol=TOL, rtol=0)

    out = dj.save_target(ours, tmp_path / "saved")
    # same key names (per-expert MoE names, no lm_head when tied) and shapes as save_pretrained
    assert _checkpoint_keys(out) == _checkpoint_keys(hf_dir)
    # and the same bits: fp32 round trips through the transposes exactly
    saved = load_file(os.path.join(out, "model.safetensors"))
    reference = load_file(os.path.join(hf_dir, "model.safetensors"))
    for key, arr in saved.items():
        assert arr.dtype == reference[key].dtype and np.array_equal(arr, reference[key]), key
    assert dj.TargetConfig.from_json(out) == ours.config

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    np.testing.assert_allclose(_hf_logits(reloaded, ids), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_load_save_load_fp32_bit_identical(kind, jax_targets, tmp_path):
    first = jax_targets[kind]
    second = dj.load_target(dj.save_target(first, tmp_path / "a"))
    _assert_params_identical(first, second)
    assert second.config == first.config


@pytest.mark.parametrize("kind", ["odd", "moe"])
def test_load_save_load_bf16_bit_identical(kind, hf_models, jax_targets, tmp_path):
    hf_dir, _ = hf_models[kind]
    first = dj.load_target(hf_dir, dtype="bfloat16")
    # loading casts on the host: bf16 params are the fp32 checkpoint rounded to bf16
    fp32 = _params(jax_targets[kind])
    for k, v in _params(first).items():
        assert v.dtype == jnp.bfloat16, k
        assert np.array_equal(np.asarray(v), np.asarray(fp32[k]).astype(jnp.bfloat16)), k

    out = dj.save_target(first, tmp_path / "bf16")
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"

    second = dj.load_target(out, dtype="bfloat16")
    _assert_params_identical(first, second)
    assert second(jnp.asarray(_ids())).logits.dtype == jnp.bfloat16
    # a bf16 checkpoint loads into fp32 exactly (bf16 -> fp32 is lossless)
    for k, v in _params(dj.load_target(out)).items():
        assert v.dtype == jnp.float32 and np.array_equal(np.asarray(v), np.asarray(_params(first)[k], np.float32)), k


def test_sharded_checkpoint_round_trip(hf_models, jax_targets, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf_model = hf_models["moe"]
    ours = jax_targets["moe"]
    out = dj.save_target(ours, tmp_path / "sharded", max_shard_bytes=16 * 1024)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    keys = _checkpoint_keys(out)
    assert set(index["weight_map"]) == set(keys)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(4 * int(np.prod(s)) for s in keys.values())
    for key, shard in index["weight_map"].items():
        with safe_open(os.path.join(out, shard), "numpy") as f:
            assert key in f.keys()

    _assert_params_identical(ours, dj.load_target(out))
    ids = _ids()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids), atol=TOL, rtol=0)

    # saving again, unsharded, into the same directory leaves no stale shards or index behind
    dj.save_target(ours, out)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
    _assert_params_identical(ours, dj.load_target(out))


def test_load_fused_experts_layout(hf_models, jax_targets, tmp_path):
    """transformers 5 holds experts fused in memory (``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``);
    a checkpoint written from ``state_dict()`` carries those keys."""
    from safetensors.torch import save_file as torch_save_file

    hf_dir, hf_model = hf_models["moe"]
    state = hf_model.state_dict()
    fused = {k: tuple(v.shape) for k, v in state.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert fused == {  # layer 1 is dense (mlp_only_layers)
        "model.layers.0.mlp.experts.gate_up_proj": (6, 32, 32), "model.layers.0.mlp.experts.down_proj": (6, 32, 16),
        "model.layers.2.mlp.experts.gate_up_proj": (6, 32, 32), "model.layers.2.mlp.experts.down_proj": (6, 32, 16),
    }
    out = tmp_path / "fused"
    out.mkdir()
    torch_save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    shutil.copy(os.path.join(hf_dir, "config.json"), out / "config.json")

    model = dj.load_target(out)
    _assert_params_identical(model, jax_targets["moe"])
    ids = _ids()
    np.testing.assert_allclose(_our_logits(model, ids), _hf_logits(hf_model, ids), atol=TOL, rtol=0)


def test_tokenizer_travels_with_the_checkpoint(hf_models, jax_targets, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "spark": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = _copy(hf_models["dense"][0], tmp_path / "ckpt")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(ckpt)

    model = dj.load_target(ckpt)
    assert model.tokenizer("hello spark world")["input_ids"] == [1, 3, 2]
    assert dj.load_target(ckpt, load_tokenizer=False).tokenizer is None
    assert jax_targets["dense"].tokenizer is None  # save_pretrained wrote no tokenizer there
    out = dj.save_target(model, tmp_path / "saved")
    assert dj.load_target(out).tokenizer("world hello")["input_ids"] == [2, 1]


# ---- bad input --------------------------------------------------------------------------------

@pytest.fixture
def dense_copy(hf_models, tmp_path):
    return _copy(hf_models["dense"][0], tmp_path / "ckpt")


def test_missing_key(dense_copy):
    _edit_tensors(dense_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(dj.CheckpointError, match=r"missing key\(s\).*model\.layers\.1\.self_attn\.k_proj\.weight"):
        dj.load_target(dense_copy)


def test_missing_lm_head_when_untied(dense_copy):
    _edit_tensors(dense_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(dj.CheckpointError, match=r"missing key\(s\).*'lm_head\.weight'"):
        dj.load_target(dense_copy)


def test_missing_expert(hf_models, tmp_path):
    ckpt = _copy(hf_models["moe"][0], tmp_path / "ckpt")
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.4.up_proj.weight"))
    with pytest.raises(dj.CheckpointError, match=r"layers\.2\.mlp\.up_proj: experts \[4\] are missing"):
        dj.load_target(ckpt)


def test_expert_beyond_num_experts_is_unexpected(hf_models, tmp_path):
    ckpt = _copy(hf_models["moe"][0], tmp_path / "ckpt")
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.experts.6.gate_proj.weight":
                                            t["model.layers.0.mlp.experts.0.gate_proj.weight"]}))
    with pytest.raises(dj.CheckpointError, match=r"unexpected key\(s\).*'model\.layers\.0\.mlp\.experts\.6\.gate_proj"):
        dj.load_target(ckpt)


def test_key_in_two_files(dense_copy):
    tensors = load_file(os.path.join(dense_copy, "model.safetensors"))
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, os.path.join(dense_copy, "extra.safetensors"))
    with pytest.raises(dj.CheckpointError, match=r"key 'model\.norm\.weight' appears in both .*extra\.safetensors "
                                                 r"and .*model\.safetensors"):
        dj.load_target(dense_copy)


def test_unknown_dtype(dense_copy):
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        dj.load_target(dense_copy, dtype="int8")


def test_wrong_shape(dense_copy):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 31), np.float32)

    _edit_tensors(dense_copy, edit)
    with pytest.raises(dj.CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(64, 31\) "
                                                 r"but the model expects \(64, 32\)"):
        dj.load_target(dense_copy)


def test_transposed_weight_is_a_shape_error(dense_copy):
    def edit(t):
        t["model.layers.2.mlp.down_proj.weight"] = np.ascontiguousarray(t["model.layers.2.mlp.down_proj.weight"].T)

    _edit_tensors(dense_copy, edit)
    with pytest.raises(dj.CheckpointError, match=r"down_proj\.weight' has shape \(64, 32\).*expects \(32, 64\)"):
        dj.load_target(dense_copy)


def test_unexpected_extra_keys(dense_copy):
    def edit(t):
        t["model.layers.7.self_attn.q_proj.weight"] = np.zeros((32, 32), np.float32)  # a layer the config lacks
        t["model.extra_thing.weight"] = np.zeros((3,), np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((4,), np.float32)  # ignored buffer

    _edit_tensors(dense_copy, edit)
    with pytest.raises(dj.CheckpointError, match=r"unexpected key\(s\).*'model\.extra_thing\.weight'") as info:
        dj.load_target(dense_copy)
    assert "'model.layers.7.self_attn.q_proj.weight'" in str(info.value)
    assert "inv_freq" not in str(info.value)


def test_bias_in_a_model_without_bias_is_unexpected(dense_copy):
    _edit_tensors(dense_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(dj.CheckpointError, match=r"unexpected key\(s\).*q_proj\.bias"):
        dj.load_target(dense_copy)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llama"), "model_type='llama' is not supported"),
    (lambda c: c.pop("num_hidden_layers"), "missing field 'num_hidden_layers'"),
    (lambda c: c.update(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
], ids=["model_type", "missing_field", "heads"])
def test_bad_config(dense_copy, edit, match):
    _edit_config(dense_copy, edit)
    with pytest.raises(dj.ConfigError, match=match) as info:
        dj.load_target(dense_copy)
    assert "config.json" in str(info.value)


def test_malformed_json_config(dense_copy):
    path = os.path.join(dense_copy, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(dj.ConfigError, match=r"config\.json: not valid JSON"):
        dj.load_target(dense_copy)


def test_truncated_safetensors(dense_copy):
    path = os.path.join(dense_copy, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(dj.CheckpointError, match=r"model\.safetensors: cannot read safetensors header \(truncated"):
        dj.load_target(dense_copy)


def test_index_names_missing_shard(jax_targets, tmp_path):
    out = dj.save_target(jax_targets["dense"], tmp_path / "sharded", max_shard_bytes=16 * 1024)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    os.remove(os.path.join(out, shards[-1]))
    with pytest.raises(dj.CheckpointError,
                       match=f"index.json lists shard\\(s\\) that do not exist: \\['{shards[-1]}'\\]"):
        dj.load_target(out)


def test_malformed_index(jax_targets, tmp_path):
    out = dj.save_target(jax_targets["dense"], tmp_path / "sharded", max_shard_bytes=16 * 1024)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(dj.CheckpointError, match=r"model\.safetensors\.index\.json: malformed index"):
        dj.load_target(out)


def test_directory_errors(hf_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*does not exist"):
        dj.load_target(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dj.load_target(tmp_path / "empty")
    (tmp_path / "config_only").mkdir()
    shutil.copy(os.path.join(hf_models["dense"][0], "config.json"), tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in .*config_only"):
        dj.load_target(tmp_path / "config_only")


# ---- onto a mesh ------------------------------------------------------------------------------

def test_make_mesh():
    assert len(jax.devices()) == 8, "conftest sets up 8 fake CPU devices"
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    assert dict(make_mesh({"tensor": 2, "data": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    small = make_mesh({"tensor": 2}, devices=jax.devices()[:4])
    assert dict(small.shape)["fsdp"] == 2 and small.devices.size == 4
    with pytest.raises(ValueError, match="unknown mesh axis name"):
        make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 4 devices, but there are 8"):
        make_mesh({"fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="cannot be split"):
        make_mesh({"tensor": 3})


def test_logical_rules():
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    rules = LogicalRules()
    P = jax.sharding.PartitionSpec
    assert rules.spec(mesh, (64, 32), ("embed", "heads")) == P("fsdp", "tensor")
    assert rules.spec(mesh, (4, 64, 32), ("experts", "embed", "mlp")) == P("expert", "fsdp", "tensor")
    assert rules.spec(mesh, (32,), ("norm",)) == P()
    assert rules.spec(mesh, (32,), None) == P()
    # a dimension the mesh axis does not divide is replicated
    assert rules.spec(mesh, (3, 36), ("embed", "heads")) == P(None, "tensor")
    assert rules.spec(mesh, (5, 64, 32), ("experts", "embed", "mlp")) == P(None, "fsdp", "tensor")
    # two logical axes on one mesh axis: the later one is replicated
    assert rules.spec(mesh, (64, 32), ("heads", "mlp")) == P("tensor")
    assert rules.spec(mesh, (3, 32), ("heads", "mlp")) == P(None, "tensor")  # first cannot use it, second may
    # mesh axes of size 1 are fine; several mesh axes for one logical axis too
    assert LogicalRules().spec(make_mesh(), (6, 32), ("experts", "vocab")) == P("expert", "tensor")
    both = LogicalRules(rules=(("embed", ("data", "fsdp")), ("vocab", "tensor")))
    assert both.spec(make_mesh({"data": 2, "fsdp": 4}), (96, 32), ("vocab", "embed")) == P("tensor", ("data", "fsdp"))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'taps'"):
        rules.spec(mesh, (4,), ("taps",), where="drafts.fc")
    with pytest.raises(ValueError, match=r"2 logical axes \('embed', 'heads'\) for a 1-d shape"):
        rules.spec(mesh, (4,), ("embed", "heads"))
    with pytest.raises(ValueError, match="more than one rule"):
        LogicalRules(rules=(("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ValueError, match=r"\['model'\]"):
        sharding_fn(mesh, LogicalRules(rules=(("embed", "model"),)))


def test_load_onto_mesh_matches_unsharded(hf_models, jax_targets):
    hf_dir, hf_model = hf_models["moe"]
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    model = dj.load_target(hf_dir, sharding=sharding_fn(mesh))
    P = jax.sharding.PartitionSpec
    params = _params(model)
    assert params["layers.0.mlp.gate_proj"].sharding.spec == P("expert", "fsdp", "tensor")
    assert params["layers.2.mlp.down_proj"].sharding.spec == P("expert", "tensor", "fsdp")
    assert params["layers.0.self_attn.q_proj.kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["embed_tokens.embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["norm.weight"].sharding.spec == P()
    for k, v in params.items():
        assert v.sharding.mesh == mesh, k
    shard = params["layers.0.mlp.gate_proj"].addressable_shards[0].data
    assert shard.shape == (3, 16, 8)  # [6, 32, 16] split 2 x 2 x 2
    _assert_params_identical(model, jax_targets["moe"])  # same values, only placed differently

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    ids = _ids(batch=4, seq=8)
    logits = forward(state, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), _our_logits(jax_targets["moe"], ids), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(hf_model, ids), atol=TOL, rtol=0)
