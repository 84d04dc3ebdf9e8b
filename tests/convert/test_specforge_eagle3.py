"""SpecForge / SGLang Eagle3 drafts (``LlamaForCausalLMEagle3``, DRAFT_FORMATS §2.4): the Llama Eagle3 variant of
the Eagle3 module, the exact written layout, bit-identical round trips, SpecForge vs speculators equivalence
(logits and greedy speculative output), refusals and load-time checks naming the field."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import dspark_jax as dj
from dspark_jax import cli
from dspark_jax.config import TargetConfig
from dspark_jax.convert import formats
from dspark_jax.drafts.config import EAGLE3_LLAMA, specforge_eagle3_layer_ids
from dspark_jax.testing import make_bigram

V, H, NH, NKV, HD, I, T = 32, 16, 2, 1, 8, 32, 4
TAPS = (0, 1, 2)
KEEP = [1, 3, 4, 7, 9, 12, 17, 20, 25, 30]          # a pruned draft vocabulary (Vd = 10)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
FIELD = "eagle_config.eagle_aux_hidden_state_layer_ids"


@pytest.fixture(scope="module")
def target():
    return dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                        num_hidden_layers=T, num_attention_heads=NH, num_key_value_heads=NKV,
                                        head_dim=HD, initializer_range=0.5), dtype="float32")


@pytest.fixture(scope="module")
def target_dir(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    dj.save_target(target, path)
    return path


def _llama(target, taps=TAPS, **kw):
    cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", eagle3_variant=EAGLE3_LLAMA, target_layer_ids=taps,
                         num_draft_layers=1, ttt_length=3, markov_rank=0, enable_confidence_head=False,
                         dtype="float32", **kw)
    return dj.build_draft(target, cfg, seed=11)


@nnx.jit
def _chain(draft, taps, tokens, count):
    """extend over a prompt, then greedy-propose from the last row: (tokens, raw logits)."""
    cache, last = draft.extend(draft.init_cache(taps.shape[0], 16), taps, tokens, count)
    p = draft.propose(cache, last, jax.random.key(0), dj.SamplingConfig(temperature=0.0))
    return p.tokens, p.logits


@nnx.jit
def _features(target, ids):
    return target(ids, tap_layer_ids=TAPS).taps


def _tensors(path) -> dict:
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _listing(path) -> dict:
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _cfg(path) -> dict:
    return json.load(open(os.path.join(path, "config.json")))


def _edit(path, fn):
    c = _cfg(path)
    fn(c)
    json.dump(c, open(os.path.join(path, "config.json"), "w"))


def _retensor(path, drop=(), add=None):
    t = {k: v for k, v in _tensors(path).items() if k not in drop}
    t.update(add or {})
    save_file(t, os.path.join(path, "model.safetensors"))


def _same_params(a, b):
    da = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(a))}
    db = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(b))}
    assert da.keys() == db.keys()
    for p in da:
        assert da[p].dtype == db[p].dtype, p
        np.testing.assert_array_equal(np.asarray(da[p]), np.asarray(db[p]), err_msg=str(p))


def _identical_files(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and ta[k].tobytes() == tb[k].tobytes(), k
    assert _cfg(a) == _cfg(b)


def _want_keys(vd=V, embed=False):
    """DRAFT_FORMATS §2.4: file key -> (shape, dtype) of a tiny SpecForge Eagle3 checkpoint."""
    m = "midlayer."
    keys = {m + "self_attn.q_proj.weight": (NH * HD, 2 * H), m + "self_attn.k_proj.weight": (NKV * HD, 2 * H),
            m + "self_attn.v_proj.weight": (NKV * HD, 2 * H), m + "self_attn.o_proj.weight": (H, NH * HD),
            m + "mlp.gate_proj.weight": (I, H), m + "mlp.up_proj.weight": (I, H), m + "mlp.down_proj.weight": (H, I),
            m + "hidden_norm.weight": (H,), m + "input_layernorm.weight": (H,),
            m + "post_attention_layernorm.weight": (H,), "fc.weight": (H, 3 * H), "norm.weight": (H,),
            "lm_head.weight": (vd, H)}
    if embed:
        keys["embed_tokens.weight"] = (V, H)
    out = {k: (s, "BF16") for k, s in keys.items()}
    out.update({"d2t": ((vd,), "I64"), "t2d": ((V,), "BOOL")})
    return out


# ---- the module variant ----------------------------------------------------------------------------------

def test_llama_variant_module_and_deepspec_default_unchanged(target, tmp_path):
    draft = _llama(target)
    attn = draft.layers[0].self_attn
    assert attn.q_norm is None and attn.k_norm is None and attn.q_proj.bias is None
    assert draft.fc.kernel[...].shape == (3 * H, H)
    # default variant: DeepSpec's Qwen3 Eagle3, config.json with no new key
    big = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                       num_hidden_layers=6, num_attention_heads=NH, num_key_value_heads=NKV,
                                       head_dim=HD), dtype="float32")
    ds = dj.build_draft(big, dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4),
                                            num_draft_layers=1, markov_rank=0, enable_confidence_head=False))
    assert ds.layers[0].self_attn.q_norm is not None and ds.config.eagle3_variant == "deepspec"
    dj.save_draft(ds, tmp_path)
    assert not any("variant" in k for k in _cfg(tmp_path))
    with pytest.raises(dj.ConfigError, match="exactly 5"):
        dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2))
    with pytest.raises(dj.ConfigError, match="eagle3_variant"):
        dj.DraftConfig(eagle3_variant=EAGLE3_LLAMA)                      # a DSpark config
    assert specforge_eagle3_layer_ids(36) == (1, 17, 32)


# ---- what is written ---------------------------------------------------------------------------------------

def test_written_layout(target, tmp_path):
    draft = _llama(target)
    formats.export_draft(draft, tmp_path / "full", "specforge", dtype="bfloat16")
    assert _listing(tmp_path / "full") == _want_keys()
    t = _tensors(tmp_path / "full")
    assert not t["d2t"].any() and t["t2d"].all()                 # full vocabulary: zeros / all True, still saved
    c = _cfg(tmp_path / "full")
    assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 1 and c["draft_vocab_size"] == V and c["vocab_size"] == V
    assert c["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": list(TAPS)}      # output convention
    assert c["dtype"] == "bfloat16" and c["hidden_size"] == H and c["head_dim"] == HD
    assert c["rope_theta"] == c["rope_parameters"]["rope_theta"] and c["attention_bias"] is False
    for k in ("target_layer_ids", "ttt_length", "num_target_layers", "target_hidden_size", "layer_types",
              "auto_map", "fc_norm", "norm_output", "eagle3_variant", "speculators_model_type"):
        assert k not in c, k
    # pruned, with the embedding kept
    formats.export_draft(draft, tmp_path / "pruned", "specforge", dtype="bfloat16", draft_vocab=KEEP[::-1],
                         store_embedding=True)
    assert _listing(tmp_path / "pruned") == _want_keys(len(KEEP), embed=True)
    t = _tensors(tmp_path / "pruned")
    np.testing.assert_array_equal(t["d2t"] + np.arange(len(KEEP)), KEEP)
    assert np.nonzero(t["t2d"])[0].tolist() == KEEP
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(draft.lm_head[...], np.float32)[KEEP]
                                  .astype(t["lm_head.weight"].dtype))
    assert _cfg(tmp_path / "pruned")["draft_vocab_size"] == len(KEEP)


# ---- round trips and equivalence ---------------------------------------------------------------------------

def test_specforge_round_trip_is_bit_identical(target, tmp_path):
    draft = _llama(target)
    formats.export_draft(draft, tmp_path / "a", "specforge", dtype="bfloat16", draft_vocab=KEEP)
    back = dj.load_draft(tmp_path / "a", target=target)          # embed_tokens comes from the target
    assert back.dtype == jnp.bfloat16 and back.config.draft_vocab == tuple(KEEP)
    assert back.config.eagle3_variant == EAGLE3_LLAMA and back.config.target_layer_ids == TAPS
    formats.export_draft(back, tmp_path / "b", "specforge")
    _identical_files(tmp_path / "a", tmp_path / "b")
    # a checkpoint that keeps its embedding needs no target, and keeps it
    formats.export_draft(draft, tmp_path / "c", "specforge", dtype="bfloat16", store_embedding=True)
    assert formats.read_checkpoint(tmp_path / "c").shared == ()
    formats.export_draft(dj.load_draft(tmp_path / "c"), tmp_path / "d", "specforge", store_embedding=True)
    _identical_files(tmp_path / "c", tmp_path / "d")
    # through the command, without a target (both sides leave the embedding out)
    assert cli.main(["convert", "draft", str(tmp_path / "a"), str(tmp_path / "e"), "--to", "specforge"]) == 0
    _identical_files(tmp_path / "a", tmp_path / "e")


def test_hand_written_specforge_config(tmp_path, capsys):
    """A config shaped like SpecForge's own configs/qwen3-4b-eagle3.json (transformers 4 spelling, Qwen3 noise,
    tie_word_embeddings copied from the target, no eagle_config), weights as SpecForge writes them (midlayer.*,
    d2t/t2d, no embedding): the taps default to SpecForge's [1, T//2-1, T-4] of the target given, the draft is
    the same, and the tensors come back byte for byte."""
    deep = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                        num_hidden_layers=8, num_attention_heads=NH, num_key_value_heads=NKV,
                                        head_dim=HD, initializer_range=0.5), dtype="float32")
    taps = specforge_eagle3_layer_ids(8)
    assert taps == (1, 3, 4)
    formats.export_draft(_llama(deep, taps=taps), tmp_path / "x", "specforge", draft_vocab=KEEP)
    ref = dj.load_draft(tmp_path / "x", target=deep)          # lm_head rows outside KEEP are zeros
    json.dump({"architectures": ["LlamaForCausalLMEagle3"], "attention_bias": False, "attention_dropout": 0.0,
               "bos_token_id": 1, "eos_token_id": 2, "head_dim": HD, "hidden_act": "silu", "hidden_size": H,
               "initializer_range": 0.02, "intermediate_size": I, "max_position_embeddings": 2048,
               "max_window_layers": 36, "model_type": "llama", "num_attention_heads": NH, "num_hidden_layers": 1,
               "num_key_value_heads": NKV, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
               "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "float32",
               "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": V,
               "draft_vocab_size": len(KEEP)}, open(tmp_path / "x" / "config.json", "w"))
    with pytest.raises(formats.FormatError, match=r"no eagle_config\.eagle_aux_hidden_state_layer_ids.*pass the "
                                                  "target"):
        dj.load_draft(tmp_path / "x")
    loaded = dj.load_draft(tmp_path / "x", target=deep)
    assert loaded.dtype == jnp.float32 and loaded.config.draft_vocab == tuple(KEEP)
    assert loaded.config.target_layer_ids == taps
    _same_params(ref, loaded)
    formats.export_draft(loaded, tmp_path / "y", "specforge")
    for k, v in _tensors(tmp_path / "x").items():
        assert v.tobytes() == _tensors(tmp_path / "y")[k].tobytes(), k
    c, c0 = _cfg(tmp_path / "y"), _cfg(tmp_path / "x")
    assert c["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}       # now explicit
    for k in ("max_window_layers", "tie_word_embeddings", "use_sliding_window", "sliding_window", "rope_theta",
              "draft_vocab_size", "model_type", "architectures", "head_dim", "num_hidden_layers"):
        assert c[k] == c0[k], k
    dj.save_target(deep, tmp_path / "t")
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "x"), "--target", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    assert "SpecForge's default [1, T//2-1, T-4] = [1, 3, 4] for the 8-layer target" in text
    assert "target check: ok" in text
    with pytest.raises(SystemExit, match="pass the target"):
        cli.main(["inspect", str(tmp_path / "x")])
    # vLLM's naming (layers.0.* instead of midlayer.*) is read too
    t = _tensors(tmp_path / "x")
    _retensor(tmp_path / "x", drop=[k for k in t if k.startswith("midlayer.")],
              add={"layers.0." + k[len("midlayer."):]: v for k, v in t.items() if k.startswith("midlayer.")})
    _same_params(ref, dj.load_draft(tmp_path / "x", target=deep))


@pytest.mark.parametrize("pruned", [False, True])
def test_specforge_and_speculators_give_the_same_draft_and_greedy_output(target, target_dir, tmp_path, pruned):
    draft = _llama(target)
    formats.export_draft(draft, tmp_path / "sf", "specforge", draft_vocab=KEEP if pruned else None)
    # SpecForge -> speculators: the embedding comes from --target; ids become input-convention
    assert cli.main(["convert", "draft", str(tmp_path / "sf"), str(tmp_path / "sp"), "--to", "speculators",
                     "--target", str(target_dir)]) == 0
    c = _cfg(tmp_path / "sp")
    assert c["speculators_model_type"] == "eagle3" and c["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert c["transformer_layer_config"]["model_type"] == "llama" and c["norm_before_residual"] is False
    assert c["draft_vocab_size"] == (len(KEEP) if pruned else V)
    assert ("d2t" in _listing(tmp_path / "sp")) == pruned
    assert not any("q_norm" in k for k in _listing(tmp_path / "sp"))
    sf, sp = dj.load_draft(tmp_path / "sf", target=target), dj.load_draft(tmp_path / "sp", target=target)
    assert sf.config == sp.config
    _same_params(sf, sp)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 9)), jnp.int32)
    taps = _features(target, ids)
    nxt = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    count = jnp.array([9, 6])
    toks_sf, logits_sf = _chain(sf, taps, nxt, count)
    toks_sp, logits_sp = _chain(sp, taps, nxt, count)
    np.testing.assert_array_equal(logits_sf, logits_sp)
    np.testing.assert_array_equal(toks_sf, toks_sp)
    if pruned:
        assert set(np.asarray(toks_sf).ravel().tolist()) <= set(KEEP)
        out = np.asarray(logits_sf)
        assert np.isneginf(np.delete(out, KEEP, axis=-1)).all() and np.isfinite(out[..., KEEP]).all()
    want = dj.generate(target, PROMPTS, max_new_tokens=16, stop_token_ids=())
    got_sf = dj.speculative_generate(target, sf, PROMPTS, max_new_tokens=16, stop_token_ids=())
    got_sp = dj.speculative_generate(target, sp, PROMPTS, max_new_tokens=16, stop_token_ids=())
    np.testing.assert_array_equal(got_sf.tokens, want.tokens)
    np.testing.assert_array_equal(got_sp.tokens, want.tokens)
    np.testing.assert_array_equal(got_sf.accept_lengths, got_sp.accept_lengths)
    # and back: speculators -> SpecForge gives the original files
    formats.export_draft(sp, tmp_path / "sf2", "specforge")
    _identical_files(tmp_path / "sf", tmp_path / "sf2")


# ---- refusals and load-time checks ---------------------------------------------------------------------------

def test_refusals_name_the_reason(target, tmp_path):
    big = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                       num_hidden_layers=6, num_attention_heads=NH, num_key_value_heads=NKV,
                                       head_dim=HD), dtype="float32")
    deepspec = dj.build_draft(big, dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4),
                                                  num_draft_layers=1, markov_rank=0, enable_confidence_head=False))
    with pytest.raises(formats.FormatError, match="q_norm/k_norm"):
        formats.export_draft(deepspec, tmp_path / "a", "specforge")
    with pytest.raises(formats.FormatError, match="exactly 3 tapped layers.*taps 2"):
        formats.export_draft(_llama(target, taps=(0, 1)), tmp_path / "b", "specforge")
    llama = _llama(target)
    with pytest.raises(formats.FormatError, match="no q_norm/k_norm"):
        formats.export_draft(llama, tmp_path / "c", "deepspec")
    with pytest.raises(dj.ConfigError, match="Llama-style Eagle3"):
        dj.save_draft(llama, tmp_path / "d")
    with pytest.raises(formats.FormatError, match="no z-lab layout"):
        formats.export_draft(llama, tmp_path / "e", "zlab")
    assert not any((tmp_path / n).exists() for n in "abcde")


def _pruned_file(target, path):
    formats.export_draft(_llama(target), path, "specforge", draft_vocab=KEEP)


@pytest.mark.parametrize("edit,tensors,match", [
    # tap count vs the format / vs fc's width, naming the file's field
    (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[0, 1]), None,
     r"eagle_config\.eagle_aux_hidden_state_layer_ids=\[0, 1\] lists 2 layers"),
    (None, {"fc.weight": np.zeros((H, 2 * H), np.float32)},
     r"fc\.weight has shape \(16, 32\).*eagle_config\.eagle_aux_hidden_state_layer_ids=\[0, 1, 2\]"),
    (lambda c: c.pop("eagle_config"), None, r"no eagle_config\.eagle_aux_hidden_state_layer_ids"),
    # pruned vocabulary: d2t / t2d / draft_vocab_size must agree
    (None, {"t2d": np.isin(np.arange(V), KEEP[:-1] + [31])}, "d2t and t2d disagree"),
    (None, {"d2t": np.zeros(len(KEEP) - 1, np.int64)}, r"d2t has shape \(9,\).*draft_vocab_size"),
    (lambda c: c.update(draft_vocab_size=len(KEEP) + 2), None, r"lm_head\.weight has 10 rows but draft_vocab_size=12"),
    (lambda c: c.update(draft_vocab_size=V + 1), None, "draft_vocab_size=33 must be"),
    (lambda c: c.pop("draft_vocab_size"), None, "missing field 'draft_vocab_size'"),
    (None, {"embed_tokens.weight": np.zeros((V + 1, H), np.float32)}, r"embed_tokens\.weight has 33 rows"),
    # what the Eagle3 module here cannot express
    (lambda c: c.update(fc_norm=True), None, "fc_norm=true"),
    (lambda c: c.update(attention_bias=True), None, "attention_bias=true"),
    (lambda c: c.update(target_hidden_size=2 * H), None, "target_hidden_size=32"),
    (lambda c: c.update(num_hidden_layers=2), None, "num_hidden_layers=2"),
    (lambda c: c.update(model_type="qwen3"), None, "model_type='qwen3'"),
])
def test_mismatched_checkpoint_fails_at_load_naming_the_field(target, tmp_path, edit, tensors, match):
    _pruned_file(target, tmp_path)
    if edit is not None:
        _edit(tmp_path, edit)
    if tensors is not None:
        _retensor(tmp_path, add=tensors)
    with pytest.raises((dj.ConfigError, dj.CheckpointError), match=match):
        dj.load_draft(tmp_path, target=target)


def test_inspect(target, target_dir, tmp_path, capsys):
    _pruned_file(target, tmp_path / "sf")
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "sf"), "--target", str(target_dir), "--json",
                     str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    for want in ("SpecForge eagle3 draft", f"{FIELD}=[0, 1, 2] (output convention) = outputs of target layers "
                 "[0, 1, 2]", "no q/k norms", f"pruned draft vocab {len(KEEP)}",
                 "not stored (taken from the target at load): embed_tokens.weight", "target check: ok",
                 "midlayer.self_attn.q_proj.weight", "d2t", "t2d"):
        assert want in text, want
    info = json.load(open(tmp_path / "i.json"))
    assert info["format"] == "specforge" and info["algorithm"] == "eagle3" and info["eagle3_variant"] == "llama"
    assert info["tensors"]["lm_head.weight"] == {"shape": [len(KEEP), H], "dtype": "F32"}


def test_oracle_pruned_specforge_draft_accepts_every_draft(tmp_path):
    """A target that always emits token c (bigram layers, positive embedding dim 0, head = e_0 for c only) and a
    SpecForge Eagle3 draft built to propose c from its pruned head (c is draft index 7; every other kept row
    scores -e_0): read back through lm_head [Vd, H] + d2t, every draft is accepted and the output is the
    target's. A wrong draft-to-target id mapping would propose id 7 and accept nothing."""
    c = KEEP[7]
    t = make_bigram(dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                                 num_hidden_layers=T, num_attention_heads=NH,
                                                 num_key_value_heads=NKV, head_dim=HD, initializer_range=0.5),
                                    dtype="float32", seed=3))
    emb = np.array(t.embed_tokens.embedding[...])
    emb[:, 0] = np.abs(emb[:, 0]) + 0.5
    t.embed_tokens.embedding[...] = jnp.asarray(emb)
    e0 = np.eye(H, dtype=np.float32)[0]
    t.norm.weight[...] = jnp.asarray(e0)
    head = np.zeros((H, V), np.float32)
    head[0, c] = 1.0
    t.lm_head.kernel[...] = jnp.asarray(head)
    draft = _llama(t)
    fc = np.zeros((3 * H, H), np.float32)
    fc[0, 0] = 1.0                                   # h = (tap0[0], 0, ...): dim 0 > 0, and it stays so
    draft.fc.kernel[...] = jnp.asarray(fc)
    layer = draft.layers[0]
    layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
    layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    draft.norm.weight[...] = jnp.asarray(e0)
    rows = np.tile(-e0, (V, 1))
    rows[c] = e0
    draft.lm_head[...] = jnp.asarray(rows)
    formats.export_draft(draft, tmp_path, "specforge", draft_vocab=KEEP)
    assert formats.read_checkpoint(tmp_path).file_tensors["lm_head.weight"][0] == (len(KEEP), H)
    loaded = dj.load_draft(tmp_path, target=t)
    want = dj.generate(t, PROMPTS, max_new_tokens=16, stop_token_ids=())
    assert (np.asarray(want.tokens) == c).all()
    out = dj.speculative_generate(t, loaded, PROMPTS, max_new_tokens=16, stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, want.tokens)
    assert out.stats["tau"] == loaded.config.ttt_length + 1
