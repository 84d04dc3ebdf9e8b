"""DeepSeek-V3-family targets against transformers' DeepseekV3ForCausalLM (torch CPU, fp32) on tiny random models.

The two models differ where the family differs: q low-rank on / off, YaRN with DeepSeek's mscale correction
(``mscale != mscale_all_dim``, so both the rotary attention factor and the softmax scale move) / plain RoPE,
interleaved / rotate-half RoPE, dense-then-MoE / all-MoE layers, one / two shared experts, group-limited routing
(4 groups, best 2) / one group, normalised / unnormalised top-k, attention biases, tied / untied head. Every 1-D
weight is perturbed away from its init and the selection bias (zeros at init) is random, so a mix-up shows.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_parity import assert_decode_matches, assert_logits_and_taps_match, assert_round_trip, forward, hf_pairs
from prefill_check import assert_prefill_matches_empty_cache_forward

torch = pytest.importorskip("torch", reason="torch (test extra) runs the transformers reference")

from flax import nnx  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.config import ConfigError  # noqa: E402
from dspark_jax.targets.deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402
from dspark_jax.targets.deepseek_v3_config import DeepseekV3Config  # noqa: E402

TOL = 1e-4
KINDS = ("lora_yarn", "plain")
VOCAB = 72


def _hf_config(kind):
    from transformers import DeepseekV3Config as HFConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=256,
                initializer_range=0.2, eos_token_id=1, bos_token_id=2, pad_token_id=0, num_mtp_layers=0)
    if kind == "lora_yarn":
        base.update(q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                    norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8,
                                     "beta_fast": 32, "beta_slow": 1})
    else:
        base.update(q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                    norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False, tie_word_embeddings=True,
                    attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return HFConfig(**base)


@pytest.fixture(scope="module")
def ds_pairs(tmp_path_factory):
    """kind -> (checkpoint dir, transformers model, our target loaded from that dir)."""
    from transformers import DeepseekV3ForCausalLM as HFDeepseek

    # every 1-D weight moved off its init; the selection bias (zeros at init) random
    return hf_pairs(tmp_path_factory, HFDeepseek, _hf_config, KINDS, 200, lambda p: p.add_(0.2 * torch.randn_like(p)),
                    "e_score_correction_bias", lambda b: b.copy_(0.3 * torch.randn_like(b)))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_taps_match_transformers(kind, ds_pairs):
    _, hf, target = ds_pairs[kind]
    assert isinstance(target, DeepseekV3ForCausalLM)
    assert_logits_and_taps_match(hf, target, np.random.default_rng(1).integers(0, VOCAB, size=(2, 13)), TOL)


def test_group_limited_routing_and_bias_match_transformers(ds_pairs):
    """The router's chosen experts and weights equal transformers' (the bias steers selection, not weights)."""
    _, hf, target = ds_pairs["lora_yarn"]
    x = np.random.default_rng(2).standard_normal((40, 32)).astype(np.float32)
    gate = hf.model.layers[1].mlp.gate
    with torch.no_grad():
        _, w_ref, idx_ref = gate(torch.tensor(x))
    w, idx = target.layers[1].mlp.route(jnp.asarray(x))
    order_ref, order = np.argsort(idx_ref.numpy(), 1), np.argsort(np.asarray(idx), 1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1),
                                  np.take_along_axis(idx_ref.numpy(), order_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(w_ref.numpy(), order_ref, 1), atol=1e-6, rtol=0)
    groups = np.asarray(idx) // 2                       # 8 experts in 4 groups: at most topk_group=2 groups used
    assert max(len(set(g)) for g in groups.tolist()) <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_absorbed_decode_equals_full_forward(kind, ds_pairs):
    """Token by token through the latent cache (one-token steps attend in the absorbed form)."""
    _, _, target = ds_pairs[kind]
    ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, size=(2, 14)))
    assert_decode_matches(target, ids, TOL)


def test_absorbed_and_expanded_attention_agree(ds_pairs):
    """Both MLA forms on the same latent cache and queries (several tokens, a causal cache mask)."""
    from dspark_jax.cache import causal_cache_mask

    _, _, target = ds_pairs["lora_yarn"]
    layer = target.layers[1]
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)).astype(np.float32))
    cache = target(jnp.asarray(rng.integers(0, VOCAB, size=(2, 7))), target.init_cache(2, 12)).cache
    start = cache.lengths
    cos, sin = target.rope(start[:, None] + jnp.arange(5)[None])
    attn = layer.self_attn
    q_nope, q_pe = attn.queries(x, cos, sin)
    from dspark_jax.cache import write_rows

    lat = write_rows(cache.keys[1], attn.latent(x, cos, sin), start)
    mask = causal_cache_mask(start, 5, 12)
    np.testing.assert_allclose(np.asarray(attn.attend_absorbed(q_nope, q_pe, lat, mask)),
                               np.asarray(attn.attend_expanded(q_nope, q_pe, lat, mask)), atol=1e-5, rtol=0)


def test_latent_cache_holds_only_the_latent_and_decode_reads_no_per_head_kv(ds_pairs):
    _, _, target = ds_pairs["lora_yarn"]
    c = target.config
    cache = target.init_cache(2, 16)
    for k, v in zip(cache.keys, cache.values):
        assert k.shape == (2, 16, 1, c.kv_lora_rank + c.qk_rope_head_dim)
        assert v.shape[-1] == 0
    per_token = sum(int(np.prod(k.shape[2:])) + int(np.prod(v.shape[2:])) for k, v in zip(cache.keys, cache.values))
    assert per_token == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    pf = target.prefill(jnp.zeros((2, 5), jnp.int32), 16)
    assert [k.shape for k in pf.cache.keys] == [k.shape for k in cache.keys]

    # the one-token step's program: no [B, C, heads, *] array (per-head keys or values of the cache) anywhere
    graphdef, state = nnx.split(target)

    def step(state, ids, cache):
        return nnx.merge(graphdef, state)(ids, cache).logits

    jaxpr = jax.make_jaxpr(step)(state, jnp.zeros((2, 1), jnp.int32), pf.cache)
    shapes = _all_shapes(jaxpr.jaxpr)
    per_head = [s for s in shapes if len(s) == 4 and s[:3] == (2, 16, c.num_attention_heads)]
    assert not per_head, per_head
    # while a several-token forward through the cache does up-project (the expanded form)
    jaxpr2 = jax.make_jaxpr(step)(state, jnp.zeros((2, 3), jnp.int32), pf.cache)
    assert any(len(s) == 4 and s[:3] == (2, 16, c.num_attention_heads) for s in _all_shapes(jaxpr2.jaxpr))


def _all_shapes(jaxpr):
    """Shapes of every value a jaxpr (and the jaxprs nested in its equations: jit, while, cond) computes."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for item in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    out += _all_shapes(inner)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_into_a_fresh_cache_equals_extending_an_empty_one(kind, ds_pairs):
    assert_prefill_matches_empty_cache_forward(ds_pairs[kind][2], np.random.default_rng(5), lengths=[9, 6],
                                               capacity=14, taps=(0, 1), tol=TOL)


def test_flat_ragged_verification_equals_full_forward(ds_pairs):
    """``forward_flat`` (the decode loop's verification: absorbed, flattened rows, padding tokens) gives each
    token the logits of a full forward and writes its latent where an ordinary extension would."""
    _, _, target = ds_pairs["lora_yarn"]
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, VOCAB, size=10), rng.integers(0, VOCAB, size=10)]
    lens = np.array([4, 7])
    prompt = np.zeros((2, 7), np.int64)
    for b in range(2):
        prompt[b, :lens[b]] = seqs[b][:lens[b]]
    cache = target.prefill(jnp.asarray(prompt), 16, num_new=jnp.asarray(lens)).cache
    row = np.array([0, 0, 0, 1, 1, -1])
    pos = np.array([4, 5, 6, 7, 8, 0])
    ids = np.array([seqs[0][4], seqs[0][5], seqs[0][6], seqs[1][7], seqs[1][8], 0])
    for layout in (None, (jnp.asarray([0, 1, 2, 0, 1, 0]), 3)):
        out = target.forward_flat(jnp.asarray(ids), jnp.asarray(row), jnp.asarray(pos), cache, tap_layer_ids=(0,),
                                  layout=layout)
        for t in range(5):
            b, p = row[t], pos[t]
            full = np.asarray(forward(target, jnp.asarray(seqs[b][None, :p + 1]))[0][0, p])
            np.testing.assert_allclose(np.asarray(out.logits[t]), full, atol=TOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(out.cache.lengths), lens)
        ext = target(jnp.asarray(np.stack([seqs[0][4:6], seqs[1][7:9]])), cache).cache
        np.testing.assert_allclose(np.asarray(out.cache.keys[2][0, 4:6]), np.asarray(ext.keys[2][0, 4:6]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.cache.keys[2][1, 7:9]), np.asarray(ext.keys[2][1, 7:9]), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_transformers(kind, ds_pairs):
    _, hf, target = ds_pairs[kind]
    prompts = [[5, 17, 33, 8, 61, 2], [9, 40], [3, 11, 12, 70, 44, 21, 19, 6, 50, 23, 7]]
    got = dj.generate(target, prompts, max_new_tokens=32, temperature=0.0, stop_token_ids=())
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=32)
        np.testing.assert_array_equal(got.tokens[i], ref[0, len(prompt):].numpy(), err_msg=f"prompt {i}")


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_identical(kind, ds_pairs, tmp_path):
    path, hf, target = ds_pairs[kind]
    from transformers import DeepseekV3ForCausalLM as HFDeepseek

    ids = np.random.default_rng(5).integers(0, VOCAB, size=(1, 9))
    assert_round_trip(target, hf, HFDeepseek, tmp_path / "out", ids)


def test_mtp_layers_are_skipped_and_other_strays_refused(ds_pairs, tmp_path):
    """A released checkpoint stores its multi-token-prediction module as layer ``num_hidden_layers``: recognised and
    skipped; a stray key anywhere else is still an error naming it."""
    from safetensors.numpy import load_file, save_file

    path, _, target = ds_pairs["lora_yarn"]
    tensors = load_file(f"{path}/model.safetensors")
    cfg = json.loads(open(f"{path}/config.json").read()) | {"num_nextn_predict_layers": 1}
    mtp = {"model.layers.3.eh_proj.weight": np.zeros((32, 64), np.float32),
           "model.layers.3.enorm.weight": np.ones(32, np.float32),
           "model.layers.3.self_attn.kv_a_layernorm.weight": np.ones(16, np.float32)}
    save_file(tensors | mtp, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = dj.load_target(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 1
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(1, 6)))
    np.testing.assert_array_equal(np.asarray(forward(loaded, ids)[0]), np.asarray(forward(target, ids)[0]))
    stray = {"model.layers.1.mlp.stray.weight": np.zeros(3, np.float32)}
    save_file(tensors | stray, str(tmp_path / "model.safetensors"))
    with pytest.raises(dj.CheckpointError, match="model.layers.1.mlp.stray.weight"):
        dj.load_target(tmp_path)


def test_bf16_load_keeps_the_router_in_fp32(ds_pairs):
    path, _, t32 = ds_pairs["plain"]
    t16 = dj.load_target(path, dtype="bfloat16")
    assert t16.layers[0].mlp.gate.kernel[...].dtype == jnp.float32
    assert t16.layers[0].self_attn.kv_b_proj.kernel[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(2, 9)))
    l16 = forward(t16, ids)[0]
    assert l16.dtype == jnp.bfloat16
    l32 = np.asarray(forward(t32, ids)[0])
    # a median, not a max: the tiny router's close top-k scores flip in bf16 for a few tokens (transformers in bf16
    # flips others), which moves those tokens' logits far by construction
    assert np.median(np.abs(np.asarray(l16.astype(jnp.float32)) - l32)) < 0.02 * np.abs(l32).max()


def test_config_reads_both_rope_spellings_and_round_trips(ds_pairs):
    path, _, target = ds_pairs["lora_yarn"]
    d = json.loads(open(f"{path}/config.json").read())
    released = {k: v for k, v in d.items() if k != "rope_parameters"} | {
        "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                                "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32,
                                                "beta_slow": 1}}
    assert DeepseekV3Config.from_hf_dict(released) == target.config
    assert DeepseekV3Config.from_hf_dict(target.config.to_hf_dict()) == target.config


@pytest.mark.parametrize("change, message", [
    ({"n_group": 3}, "n_group=3 must be a positive divisor of n_routed_experts=8"),
    ({"topk_group": 5}, "topk_group=5 must be in"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"kv_lora_rank": None}, "missing field 'kv_lora_rank'"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 must be even"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 must equal num_attention_heads=4"),
])
def test_bad_configs_name_the_field(ds_pairs, change, message):
    d = ds_pairs["lora_yarn"][2].config.to_hf_dict() | change
    with pytest.raises(ConfigError, match=message):
        DeepseekV3Config.from_hf_dict(d, where="cfg.json")


@pytest.mark.parametrize("kind", ("dspark", "eagle3"))
def test_speculative_greedy_equals_target_greedy(kind, ds_pairs):
    """A (random) draft bound to the DeepSeek target through its default Qwen3 backbone: speculative decoding is
    lossless whatever the draft proposes, through both the padded and the flat ragged (absorbed) verification."""
    _, _, target = ds_pairs["lora_yarn"]
    if kind == "dspark":
        cfg = dj.DraftConfig(block_size=4, mask_token_id=VOCAB - 1, target_layer_ids=(0, 1), num_anchors=3,
                             num_draft_layers=1, markov_rank=4, markov_head_type="vanilla",
                             enable_confidence_head=True, dtype="float32")
    else:
        cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", eagle3_variant="llama", block_size=4,
                             target_layer_ids=(0, 1), num_draft_layers=1, dtype="float32")
    draft = dj.build_draft(target, cfg, seed=3)
    assert draft.config.arch.hidden_size == target.config.hidden_size
    prompts = [[5, 17, 33, 8, 61, 2], [9, 40, 3]]
    want = dj.generate(target, prompts, max_new_tokens=20, temperature=0.0, stop_token_ids=())
    for ragged in (False, True):
        got = dj.speculative_generate(target, draft, prompts, max_new_tokens=20, temperature=0.0,
                                      stop_token_ids=(), ragged_verify=ragged)
        for i in range(len(prompts)):
            np.testing.assert_array_equal(got.tokens[i], want.tokens[i], err_msg=f"ragged={ragged} prompt {i}")


def _fp8_checkpoint(src: str, dst, block=(16, 16)):
    """The checkpoint at ``src`` re-written in DeepSeek's release layout: every 2-D projection inside the decoder
    layers (not the router) FP8 e4m3 with a ``weight_scale_inv`` per ``block`` tile, ``quantization_config`` set.
    Returns {key: the fp32 weight that layout dequantizes to}."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    tensors = load_file(f"{src}/model.safetensors")
    out, expected = {}, {}
    for key, w in tensors.items():
        quantize = key.startswith("model.layers.") and w.ndim == 2 and ".gate.weight" not in key
        if not quantize:
            out[key] = torch.from_numpy(np.ascontiguousarray(w))
            continue
        rows, cols = (-(-n // b) for n, b in zip(w.shape, block))
        pad = np.zeros((rows * block[0], cols * block[1]), np.float32)
        pad[:w.shape[0], :w.shape[1]] = w
        tiles = pad.reshape(rows, block[0], cols, block[1])
        scale = np.abs(tiles).max(axis=(1, 3)) / 448.0
        q = torch.from_numpy(pad / np.repeat(np.repeat(scale, block[0], 0), block[1], 1))[:w.shape[0], :w.shape[1]]
        q = q.contiguous().to(torch.float8_e4m3fn)
        out[key] = q
        out[key[:-len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale.astype(np.float32))
        expected[key] = q.to(torch.float32).numpy() * np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[
            :w.shape[0], :w.shape[1]]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(open(f"{src}/config.json").read())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return out, expected


def test_fp8_block_quantized_checkpoint_loads_to_the_dequantized_weights(ds_pairs, tmp_path):
    """Tiles of 16 x 16 over weights whose sides are not multiples of 16 (partial edge tiles)."""
    from safetensors.torch import save_file

    path, _, target = ds_pairs["lora_yarn"]
    written, expected = _fp8_checkpoint(path, tmp_path)
    loaded = dj.load_target(tmp_path, load_tokenizer=False)
    from dspark_jax.convert.deepseek_v3 import deepseek_v3_to_torch_tensors

    got, original = deepseek_v3_to_torch_tensors(loaded), deepseek_v3_to_torch_tensors(target)
    assert set(got) == set(original)
    assert len(expected) > 40            # attention and expert projections of all three layers
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    for key in set(got) - set(expected):  # embeddings, norms, router, head: not quantized, unchanged
        np.testing.assert_array_equal(got[key], original[key], err_msg=key)

    bad = dict(written)
    bad["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(bad, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(dj.CheckpointError, match=r"model.layers.1.self_attn.o_proj.weight_scale_inv.*\(1, 1\)"):
        dj.load_target(tmp_path, load_tokenizer=False)
    del bad["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(bad, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(dj.CheckpointError, match="o_proj.weight' is F8_E4M3 but the checkpoint has no"):
        dj.load_target(tmp_path, load_tokenizer=False)


def test_expert_parallel_forward_equals_unsharded(ds_pairs):
    """Loaded straight onto 8 devices as expert=4 x data=2 (each device holds 2 of the 8 routed experts, the batch
    split over data): logits equal the single-device model's, and greedy decoding through the latent cache too."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dspark_jax.sharding import make_mesh, sharding_fn

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 fake CPU devices)")
    path, _, target = ds_pairs["lora_yarn"]
    mesh = make_mesh({"expert": 4, "data": 2}, devices=jax.devices()[:8])
    sharded = dj.load_target(path, sharding=sharding_fn(mesh), load_tokenizer=False)
    experts = sharded.layers[1].mlp.gate_proj[...]
    assert experts.sharding.spec[0] == "expert"
    assert experts.addressable_shards[0].data.shape[0] == 2
    ids = np.random.default_rng(7).integers(0, VOCAB, size=(4, 10))
    graphdef, state = nnx.split(sharded)
    sharded_forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    logits = sharded_forward(state, jax.device_put(jnp.asarray(ids), NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(target, jnp.asarray(ids))[0]), atol=TOL,
                               rtol=0)
    prompts = [list(map(int, r)) for r in ids[:2, :5]]
    np.testing.assert_array_equal(
        dj.generate(sharded, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=()).tokens,
        dj.generate(target, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=()).tokens)
