"""TargetConfig <-> Hugging Face config.json: both config vocabularies, round trips, the MoE layer rule, errors."""

import json

import pytest

from dspark_jax.config import ConfigError, RopeConfig, TargetConfig, tiny_qwen3_config

DENSE_NEW = {  # what transformers 5 writes
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128},
    "bos_token_id": 1, "eos_token_id": [2, 3], "dtype": "bfloat16",
}

MOE_NEW = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "num_local_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 2,
    "mlp_only_layers": [3], "router_aux_loss_coef": 0.01,
}

MOE_OLD = {  # what Qwen3-30B-A3B's config.json looks like (transformers 4)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 1e6, "max_window_layers": 4,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 2,
    "mlp_only_layers": [3], "torch_dtype": "bfloat16",
}


def test_new_transformers5_form():
    cfg = TargetConfig.from_hf_dict(DENSE_NEW)
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("qwen3", 96, 32, 64)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (3, 4, 2, 8)
    assert cfg.rope == RopeConfig(rope_theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=128)
    assert cfg.eos_token_ids == (2, 3) and cfg.bos_token_id == 1 and cfg.dtype == "bfloat16"
    assert cfg.num_experts == 0 and not cfg.is_moe_layer(0)

    moe = TargetConfig.from_hf_dict(MOE_NEW)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (6, 2, 16)
    assert moe.norm_topk_prob and moe.decoder_sparse_step == 2 and moe.mlp_only_layers == (3,)
    assert moe.router_aux_loss_coef == 0.01
    assert moe.rope == RopeConfig(rope_theta=10000.0)


def test_old_form_reads_the_same_as_new():
    old = TargetConfig.from_hf_dict(MOE_OLD)
    new = TargetConfig.from_hf_dict(dict(MOE_NEW, dtype="bfloat16", router_aux_loss_coef=0.001,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                          "original_max_position_embeddings": 128}))
    assert old == new
    assert old.rope.rope_type == "yarn" and old.rope.rope_theta == 1e6 and old.num_experts == 6


def test_head_dim_and_kv_heads_default_like_transformers():
    d = {k: v for k, v in DENSE_NEW.items() if k not in ("head_dim", "num_key_value_heads")}
    cfg = TargetConfig.from_hf_dict(d)
    assert cfg.head_dim == 32 // 4 and cfg.num_key_value_heads == 4


@pytest.mark.parametrize("d", [DENSE_NEW, MOE_NEW, MOE_OLD], ids=["dense-yarn", "moe-new", "moe-old"])
def test_to_hf_dict_round_trip(d):
    cfg = TargetConfig.from_hf_dict(d)
    hf = cfg.to_hf_dict()
    assert TargetConfig.from_hf_dict(json.loads(json.dumps(hf))) == cfg
    # both spellings are written, so old and new transformers read the same rope / expert count
    assert hf["rope_parameters"]["rope_theta"] == hf["rope_theta"] == cfg.rope.rope_theta
    if cfg.num_experts:
        assert hf["num_experts"] == hf["num_local_experts"] == cfg.num_experts


@pytest.mark.parametrize("d", [DENSE_NEW, MOE_NEW], ids=["dense", "moe"])
def test_transformers_reads_to_hf_dict(d):
    from transformers import AutoConfig

    cfg = TargetConfig.from_hf_dict(d)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    # and what transformers then writes reads back to the same config
    assert TargetConfig.from_hf_dict(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize("step,mlp_only", [(1, []), (2, []), (2, [3]), (3, [0, 2]), (1, [1, 4])])
def test_is_moe_layer_matches_transformers(step, mlp_only):
    torch = pytest.importorskip("torch", reason="torch (test extra) builds the reference model")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    kw = dict(vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=3, num_experts_per_tok=2,
              decoder_sparse_step=step, mlp_only_layers=mlp_only)
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw))
    theirs = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf.model.layers]
    ours = TargetConfig.from_hf_dict(dict(kw, model_type="qwen3_moe"))
    assert [ours.is_moe_layer(i) for i in range(6)] == theirs
    assert any(theirs)  # the case exercises the MoE branch


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("d,match", [
    (_without(DENSE_NEW, "hidden_size"), "missing field 'hidden_size'"),
    (_without(DENSE_NEW, "vocab_size"), "missing field 'vocab_size'"),
    (_without(DENSE_NEW, "model_type"), "missing field 'model_type'"),
    (_without(MOE_NEW, "num_experts_per_tok"), "missing field 'num_experts_per_tok'"),
    (dict(DENSE_NEW, model_type="llama"), "model_type='llama' is not supported"),
    (dict(DENSE_NEW, num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(DENSE_NEW, num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    (dict(_without(DENSE_NEW, "head_dim"), num_attention_heads=0), "num_attention_heads must be a positive integer"),
    (dict(_without(DENSE_NEW, "head_dim"), num_attention_heads=5), "hidden_size=32 not divisible by heads=5"),
    (dict(DENSE_NEW, hidden_size="big"), "hidden_size must be an integer, got 'big'"),
    (dict(DENSE_NEW, intermediate_size=64.5), "intermediate_size must be an integer"),
    (dict(DENSE_NEW, head_dim=7), "head_dim=7 must be even"),
    (dict(DENSE_NEW, hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(DENSE_NEW, use_sliding_window=True), "use_sliding_window"),
    (dict(DENSE_NEW, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='dynamic' is not supported"),
    (dict(DENSE_NEW, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "needs 'original_max_position_embeddings'"),
    (dict(DENSE_NEW, rope_parameters={"rope_theta": 1e4, "bogus": 1}), r"unsupported rope parameter\(s\) \['bogus'\]"),
    (dict(MOE_NEW, num_experts_per_tok=7), "num_experts_per_tok=7 must be in"),
    (dict(MOE_NEW, decoder_sparse_step=0), "decoder_sparse_step must be >= 1"),
    (dict(MOE_NEW, mlp_only_layers=[4]), r"mlp_only_layers has ids outside \[0, 4\): \[4\]"),
    (dict(MOE_NEW, num_local_experts=0), "'qwen3_moe' needs num_experts > 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_errors_name_the_field(d, match):
    with pytest.raises(ConfigError, match=match) as info:
        TargetConfig.from_hf_dict(d, where="some/config.json")
    assert str(info.value).startswith("some/config.json: ")


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TargetConfig.from_json(tmp_path)
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "qwen3", "vocab_size": 96,')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(line 1"):
        TargetConfig.from_json(tmp_path)
    path.write_text(json.dumps(_without(DENSE_NEW, "num_hidden_layers")))
    with pytest.raises(ConfigError, match=f"{path}: missing field 'num_hidden_layers'"):
        TargetConfig.from_json(tmp_path)
    path.write_text(json.dumps(DENSE_NEW))
    assert TargetConfig.from_json(tmp_path) == TargetConfig.from_json(path) == TargetConfig.from_hf_dict(DENSE_NEW)


def test_direct_construction_is_validated():
    assert tiny_qwen3_config().num_kv_groups == 2
    with pytest.raises(ConfigError, match="TargetConfig: num_attention_heads=4 is not a multiple"):
        tiny_qwen3_config(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="model_type 'qwen3' is dense but num_experts=4"):
        tiny_qwen3_config(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8)
