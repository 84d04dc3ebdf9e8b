"""Draft checkpoint formats (DRAFT_FORMATS.md): SpecForge, speculators, z-lab next to DeepSpec. Written layouts,
bit-identical round trips, same logits / greedy output from every format, the two conventions, load-time checks,
and the ``dspark convert draft`` / ``dspark inspect`` commands."""

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
from dspark_jax.drafts.config import BONUS_ANCHOR, layer_ids_from, layer_ids_to
from dspark_jax.testing import make_bigram, make_oracle_draft

V, H, NH, NKV, HD, I, R, T = 32, 16, 2, 1, 8, 32, 4, 4
MASK, TAPS = 31, (0, 1, 2)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]


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


def _draft(target, kind="vanilla", **kw):
    """kind: vanilla / gated / rnn DSpark, dflash (DeepSpec DFlash), zlab (bonus-anchor DFlash), eagle3."""
    if kind == "eagle3":
        cfg = dj.DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2, 3, 4),
                             num_draft_layers=1, ttt_length=3, markov_rank=0, enable_confidence_head=False)
        big = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                           num_hidden_layers=6, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
                           initializer_range=0.5)
        return dj.build_draft(dj.build_target(big, dtype="float32"), cfg, seed=3)
    base = dict(block_size=4, mask_token_id=MASK, target_layer_ids=TAPS, num_anchors=512, markov_rank=R,
                markov_head_type="vanilla", num_draft_layers=2, dtype="float32")
    if kind in ("dflash", "zlab"):
        base.update(markov_rank=0, enable_confidence_head=False)
        if kind == "zlab":
            base.update(slot_convention=BONUS_ANCHOR, block_size=3)
    else:
        base["markov_head_type"] = kind
    base.update(kw)
    return dj.build_draft(target, dj.DraftConfig(**base), seed=7)


# jitted entry points: eager JAX compiles every small op separately, which dominates these tiny tests
@nnx.jit
def _features(target, ids):
    out = target(ids, tap_layer_ids=TAPS)
    return out.taps, out.last_hidden


@nnx.jit(static_argnames="temperature")
def _propose(draft, taps, count, anchor, key, temperature=0.0):
    p = draft.propose(draft.init_cache(taps.shape[0], 16), taps, count, anchor, key,
                      dj.SamplingConfig(temperature=temperature))
    return p.tokens, p.logits


@nnx.jit
def _train_hidden(draft, ids, taps, last, anchors):
    out = draft.train_forward(ids, jnp.ones_like(ids), taps, last, anchors, jnp.ones(anchors.shape, bool),
                              materialize_logits=False)
    return out.draft_hidden, out.target_ids


@nnx.jit
def _block(draft, taps, count, anchor):
    return draft.block_hidden(draft.init_cache(taps.shape[0], 16), taps, count, anchor)[0]


@nnx.jit
def _eagle3_propose(draft, last_hidden, key):
    cache = draft.init_cache(last_hidden.shape[0], 8)
    return draft.propose(cache, last_hidden, key, dj.SamplingConfig(temperature=1.0)).tokens


def _tensors(path) -> dict:
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _listing(path) -> dict:
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _cfg(path) -> dict:
    return json.load(open(os.path.join(path, "config.json")))


def _same_params(a, b):
    da = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(a))}
    db = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(b))}
    assert da.keys() == db.keys()
    for p in da:
        assert da[p].dtype == db[p].dtype, p
        np.testing.assert_array_equal(np.asarray(da[p]), np.asarray(db[p]), err_msg=str(p))


def _deepspec_keys(kind):
    """DeepSpec's key -> shape for the tiny drafts (DRAFT_FORMATS §1.3)."""
    keys = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 3 * H),
            "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(2):
        p = f"layers.{i}."
        keys.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                     p + "self_attn.q_proj.weight": (NH * HD, H), p + "self_attn.k_proj.weight": (NKV * HD, H),
                     p + "self_attn.v_proj.weight": (NKV * HD, H), p + "self_attn.o_proj.weight": (H, NH * HD),
                     p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,),
                     p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                     p + "mlp.down_proj.weight": (H, I)})
    if kind in ("vanilla", "gated", "rnn"):
        keys.update({"markov_head.markov_w1.weight": (V, R), "markov_head.markov_w2.weight": (V, R),
                     "confidence_head.proj.weight": (1, H + R), "confidence_head.proj.bias": (1,)})
        if kind == "gated":
            keys.update({"markov_head.gate_proj.weight": (R, H + R), "markov_head.gate_proj.bias": (R,)})
        if kind == "rnn":
            keys.update({"markov_head.joint_proj.weight": (3 * R, 2 * R + H),
                         "markov_head.joint_proj.bias": (3 * R,)})
    return keys


# ---- 1. the conventions ------------------------------------------------------------------------------------

def test_layer_id_conventions():
    assert layer_ids_to((-1, 1, 9), "input") == (0, 2, 10)
    assert layer_ids_from((0, 2, 10), "input") == (-1, 1, 9)
    assert layer_ids_to((1, 9), "output") == (1, 9)
    with pytest.raises(dj.ConfigError, match="convention"):
        layer_ids_to((1,), "middle")


def test_bonus_anchor_slots_predict_their_own_position(target):
    """A bonus-anchor draft drafting Bs tokens runs Bs+1 slots [anchor, MASK..]; its draft j is slot j+1, paired
    with label x_{a+1+j}, i.e. the token at that slot's own position. The same weights read anchor-first with
    Bs+1 slots make slot j+1 predict x_{a+2+j}: same hidden states, labels one position later."""
    zl = _draft(target, "zlab")                                           # 3 drafts, 4 slots
    af = nnx.merge(*nnx.split(zl))
    af.config = zl.config.replace(slot_convention="anchor_first", block_size=4)
    assert zl.config.num_block_slots == af.config.num_block_slots == 4
    ids = jnp.asarray(np.random.default_rng(0).integers(0, MASK, (1, 12)), jnp.int32)
    taps, last = _features(target, ids)
    anchors = jnp.array([[1, 4, 7]])
    hz, tz = _train_hidden(zl, ids, taps, last, anchors)
    ha, ta = _train_hidden(af, ids, taps, last, anchors)
    np.testing.assert_allclose(hz, ha[:, :, 1:], atol=1e-5)
    np.testing.assert_array_equal(tz, ta[:, :, :3])
    np.testing.assert_array_equal(tz[0, :, 0], np.asarray(ids)[0, np.asarray(anchors[0]) + 1])
    # inference: the proposal of a bonus-anchor draft is slots 1..Bs of the block
    count, a = jnp.array([5]), ids[:, 5]
    bz, ba = _block(zl, taps[:, :5], count, a), _block(af, taps[:, :5], count, a)
    assert bz.shape == (1, 3, H)
    np.testing.assert_allclose(bz, ba[:, 1:], atol=1e-5)
    toks, _ = _propose(zl, taps[:, :5], count, a, jax.random.key(0))
    np.testing.assert_array_equal(toks, np.argmax(np.asarray(zl.base_logits(ba[:, 1:])), -1))


# ---- 2. what each format writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn", "dflash"])
def test_specforge_dspark_layout(target, tmp_path, kind):
    draft = _draft(target, kind)
    formats.export_draft(draft, tmp_path, "specforge", dtype="bfloat16")
    want = {k: s for k, s in _deepspec_keys(kind).items() if k not in formats.SHARED}
    assert {k: s for k, (s, _) in _listing(tmp_path).items()} == want
    assert {t for _, t in _listing(tmp_path).values()} == {"BF16"}
    c = _cfg(tmp_path)
    assert c["architectures"] == ["DSparkDraftModel"] and c["model_type"] == "qwen3"
    assert c["auto_map"] == {"AutoModel": "dspark.DSparkDraftModel"}
    assert c["block_size"] == 4 and c["num_target_layers"] == T and c["num_hidden_layers"] == 2
    assert "target_layer_ids" not in c and "num_anchors" not in c and "markov_rank" not in c
    dc = c["dflash_config"]
    assert dc == {"projector_type": "dspark", "attention_mode": "gqa", "mask_token_id": MASK,
                  "target_layer_ids": list(TAPS), "markov_rank": R if kind != "dflash" else 0,
                  "markov_head_type": kind if kind != "dflash" else "vanilla",
                  "enable_confidence_head": kind != "dflash", "confidence_head_with_markov": True}


def test_zlab_layout(target, tmp_path):
    formats.export_draft(_draft(target, "zlab"), tmp_path, "zlab", dtype="bfloat16")
    want = {k: s for k, s in _deepspec_keys("dflash").items() if k not in formats.SHARED}
    assert {k: s for k, (s, _) in _listing(tmp_path).items()} == want
    c = _cfg(tmp_path)
    assert c["architectures"] == ["DFlashDraftModel"] and c["auto_map"] == {"AutoModel": "dflash.DFlashDraftModel"}
    assert c["block_size"] == 4                     # slots: 1 anchor + 3 drafts
    assert c["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": list(TAPS)}
    assert not any(k in c for k in ("markov_rank", "sample_from_anchor", "target_layer_ids", "num_anchors"))


@pytest.mark.parametrize("kind,alg", [("vanilla", "dspark"), ("rnn", "dspark"), ("dflash", "dspark"),
                                      ("zlab", "dflash")])
def test_speculators_layout(target, tmp_path, kind, alg):
    draft = _draft(target, kind)
    formats.export_draft(draft, tmp_path, "speculators", verifier="Qwen/Qwen3-8B", dtype="bfloat16")
    assert {k: s for k, (s, _) in _listing(tmp_path).items()} == _deepspec_keys(kind)
    c = _cfg(tmp_path)
    bonus = kind == "zlab"
    want = {"architectures": [formats.SPECULATORS_ARCHS[alg]], "speculators_model_type": alg,
            "speculators_version": formats.SPECULATORS_VERSION, "draft_vocab_size": V, "target_hidden_size": None,
            "tie_word_embeddings": False, "dtype": "bfloat16", "block_size": 4, "mask_token_id": MASK,
            "aux_hidden_state_layer_ids": [1, 2, 3], "sample_from_anchor": not bonus,
            "sliding_window_non_causal": False}
    if kind == "dflash":    # anchor-first DFlash: a DSpark without heads, so that vLLM honours the flag
        want.update(markov_rank=0, markov_head_type="vanilla", enable_confidence_head=False,
                    confidence_head_with_markov=True)
    elif alg == "dspark":
        want.update(markov_rank=R, markov_head_type=kind, enable_confidence_head=True,
                    confidence_head_with_markov=True)
    assert {k: v for k, v in c.items() if k not in ("transformer_layer_config", "speculators_config")} == want
    assert "model_type" not in c
    tlc = c["transformer_layer_config"]
    assert tlc["model_type"] == "qwen3" and tlc["vocab_size"] == V and tlc["num_hidden_layers"] == 2
    assert not any(k in tlc for k in ("architectures", "block_size", "mask_token_id", "target_layer_ids",
                                      "num_target_layers", "num_anchors", "markov_rank", "dtype"))
    assert c["speculators_config"] == {
        "algorithm": alg, "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3 if bonus else 4,
                              "accept_tolerance": 0.0, "verifier_accept_k": 1}],
        "verifier": {"name_or_path": "Qwen/Qwen3-8B", "architectures": ["Qwen3ForCausalLM"]}}


def test_speculators_eagle3_layout(target, tmp_path):
    draft = _draft(target, "eagle3")
    dj.save_draft(draft, tmp_path / "ds")
    formats.export_draft(draft, tmp_path / "sp", "speculators")
    assert _listing(tmp_path / "sp") == _listing(tmp_path / "ds")          # key for key (DRAFT_FORMATS §5.7)
    c = _cfg(tmp_path / "sp")
    assert c["speculators_model_type"] == "eagle3" and c["architectures"] == ["Eagle3DraftModel"]
    assert c["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3, 4, 5]
    assert all(c[k] is False for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"))
    assert c["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    back = dj.load_draft(tmp_path / "sp")
    _same_params(dj.load_draft(tmp_path / "ds"), back)
    assert back.config.target_layer_ids == (0, 1, 2, 3, 4) and back.config.ttt_length == 3
    # pruned: lm_head rows + tables, and a re-write of the loaded draft gives the same tensors
    formats.export_draft(draft, tmp_path / "pr", "speculators", draft_vocab=[2, 3, 7])
    assert _listing(tmp_path / "pr")["lm_head.weight"] == ((3, H), "F32")
    pruned = dj.load_draft(tmp_path / "pr")
    assert pruned.config.draft_vocab == (2, 3, 7)
    toks = _eagle3_propose(pruned, jnp.asarray(np.random.default_rng(0).normal(size=(4, H)), jnp.float32),
                           jax.random.key(1))
    assert set(np.asarray(toks).ravel().tolist()) <= {2, 3, 7}
    formats.export_draft(pruned, tmp_path / "pr2", "speculators")
    for k, v in _tensors(tmp_path / "pr").items():
        np.testing.assert_array_equal(_tensors(tmp_path / "pr2")[k], v, err_msg=k)
    assert _cfg(tmp_path / "pr") == _cfg(tmp_path / "pr2")


def test_speculators_pruned_vocab_layout_and_tables(target, tmp_path):
    draft = _draft(target, "vanilla")
    keep = [0, 3, 4, 9, 17, 30]
    formats.export_draft(draft, tmp_path, "speculators", draft_vocab=[9, 3, 0, 4, 30, 17])
    got = _listing(tmp_path)
    assert got["lm_head.weight"] == ((6, H), "F32") and got["markov_head.markov_w2.weight"] == ((6, R), "F32")
    assert got["embed_tokens.weight"] == ((V, H), "F32") and got["markov_head.markov_w1.weight"] == ((V, R), "F32")
    assert got["d2t"] == ((6,), "I64") and got["t2d"] == ((V,), "BOOL")
    t = _tensors(tmp_path)
    np.testing.assert_array_equal(t["d2t"] + np.arange(6), keep)
    assert np.nonzero(t["t2d"])[0].tolist() == keep
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(draft.lm_head[...])[keep])
    assert _cfg(tmp_path)["draft_vocab_size"] == 6 and _cfg(tmp_path)["transformer_layer_config"]["vocab_size"] == V
    # read back: proposals only ever draw kept ids, and re-writing gives the same files
    loaded = dj.load_draft(tmp_path)
    assert loaded.config.draft_vocab == tuple(keep)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, MASK, (2, 8)), jnp.int32)
    toks, logits = _propose(loaded, _features(target, ids)[0], jnp.array([8, 6]), ids[:, -1], jax.random.key(0),
                            temperature=1.0)
    assert set(np.asarray(toks).ravel().tolist()) <= set(keep)
    assert np.isneginf(np.asarray(logits)[..., [1, 2, 5]]).all() and np.isfinite(np.asarray(logits)[..., keep]).all()
    formats.export_draft(loaded, tmp_path / "again", "speculators")
    for k, v in _tensors(tmp_path).items():
        np.testing.assert_array_equal(_tensors(tmp_path / "again")[k], v, err_msg=k)
    with pytest.raises(formats.FormatError, match="full vocabulary"):
        formats.export_draft(loaded, tmp_path / "ds", "deepspec")


# ---- 3. round trips and equivalence --------------------------------------------------------------------------

ROUND_TRIPS = [("vanilla", "specforge"), ("gated", "specforge"), ("rnn", "specforge"), ("dflash", "specforge"),
               ("vanilla", "speculators"), ("rnn", "speculators"), ("dflash", "speculators"),
               ("zlab", "zlab"), ("zlab", "specforge"), ("zlab", "speculators")]


@pytest.mark.parametrize("kind,fmt", ROUND_TRIPS)
def test_deepspec_to_format_and_back_is_bit_identical(target, tmp_path, kind, fmt):
    draft = _draft(target, kind)
    dj.save_draft(draft, tmp_path / "ds", dtype="bfloat16")
    first = dj.load_draft(tmp_path / "ds")
    formats.export_draft(first, tmp_path / "x", fmt)
    # SpecForge's DFlash export is the z-lab layout: the same reader takes both
    assert formats.read_checkpoint(tmp_path / "x").format == ("zlab" if (kind, fmt) == ("zlab", "specforge") else fmt)
    back = dj.load_draft(tmp_path / "x", target=target)
    assert back.dtype == jnp.bfloat16
    formats.export_draft(back, tmp_path / "ds2", "deepspec", allow_nonstandard=True)
    a, b = _tensors(tmp_path / "ds"), _tensors(tmp_path / "ds2")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert _cfg(tmp_path / "ds") == _cfg(tmp_path / "ds2")
    assert ("sample_from_anchor" in _cfg(tmp_path / "ds")) == (kind == "zlab")


def test_deepspec_config_unchanged_by_the_convention_fields(target, tmp_path):
    """A DeepSpec (anchor-first, full vocab) config.json carries no new key."""
    dj.save_draft(_draft(target), tmp_path)
    c = _cfg(tmp_path)
    assert "sample_from_anchor" not in c and "slot_convention" not in c and "draft_vocab" not in c
    assert c["block_size"] == 4


def _greedy_logits(draft, target):
    ids = jnp.asarray(np.random.default_rng(2).integers(0, MASK, (2, 9)), jnp.int32)
    return _propose(draft, _features(target, ids)[0], jnp.array([9, 7]), ids[:, -1], jax.random.key(0))


@pytest.mark.parametrize("kind", ["vanilla", "zlab"])
def test_every_format_gives_the_same_draft_and_greedy_output(target, tmp_path, kind):
    draft = _draft(target, kind)
    formats.export_draft(draft, tmp_path / "deepspec", "deepspec", allow_nonstandard=True)
    fmts = ["specforge", "speculators"] + (["zlab"] if kind == "zlab" else [])
    for f in fmts:
        formats.export_draft(draft, tmp_path / f, f)
    ref = dj.load_draft(tmp_path / "deepspec")
    ref_prop = _greedy_logits(ref, target)
    want = dj.speculative_generate(target, ref, PROMPTS, max_new_tokens=16, stop_token_ids=())
    np.testing.assert_array_equal(want.tokens, dj.generate(target, PROMPTS, max_new_tokens=16,
                                                           stop_token_ids=()).tokens)
    for f in fmts:
        d = dj.load_draft(tmp_path / f, target=target)
        assert d.config.slot_convention == draft.config.slot_convention
        assert d.config.target_layer_ids == TAPS and d.config.block_size == draft.config.block_size
        assert d.config == ref.config, f
        _same_params(ref, d)
        toks, logits = _greedy_logits(d, target)
        np.testing.assert_array_equal(logits, ref_prop[1], err_msg=f)
        np.testing.assert_array_equal(toks, ref_prop[0], err_msg=f)
        got = dj.speculative_generate(target, d, PROMPTS, max_new_tokens=16, stop_token_ids=())
        np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=f)
        np.testing.assert_array_equal(got.accept_lengths, want.accept_lengths, err_msg=f)


def test_bonus_anchor_oracle_from_speculators_accepts_every_draft(tmp_path):
    """An old (pre sample_from_anchor) speculators DSpark is bonus-anchor: Bs slots, Bs-1 drafts. An oracle
    draft written that way and read back drafts exactly the target: tau = drafts + 1 and greedy output equals
    the target's. Read with the wrong convention, it would propose one token per slot too many."""
    t = make_bigram(dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H,
                                                 intermediate_size=I, num_hidden_layers=T, num_attention_heads=NH,
                                                 num_key_value_heads=NKV, head_dim=HD, initializer_range=0.5),
                                    dtype="float32", seed=3))
    cfg = dj.DraftConfig(block_size=4, mask_token_id=MASK, target_layer_ids=TAPS, num_anchors=512, markov_rank=V,
                         enable_confidence_head=False, num_draft_layers=1, slot_convention=BONUS_ANCHOR,
                         dtype="float32")
    draft = make_oracle_draft(t, dj.build_draft(t, cfg, seed=1), 50.0)
    formats.export_draft(draft, tmp_path, "speculators")
    c = _cfg(tmp_path)
    assert c["block_size"] == 5 and c["sample_from_anchor"] is False
    del c["sample_from_anchor"]                                    # the pre-2026-07-13 spelling
    json.dump(c, open(tmp_path / "config.json", "w"))
    ck = formats.read_checkpoint(tmp_path)
    assert ck.config.slot_convention == BONUS_ANCHOR and ck.config.block_size == 4 and ck.notes
    loaded = dj.load_draft(tmp_path)
    out = dj.speculative_generate(t, loaded, PROMPTS, max_new_tokens=16, stop_token_ids=())
    np.testing.assert_array_equal(out.tokens, dj.generate(t, PROMPTS, max_new_tokens=16, stop_token_ids=()).tokens)
    assert out.stats["tau"] == 5.0


# ---- 4. refusals and load-time checks -------------------------------------------------------------------------

def test_refusals_name_the_reason(target, tmp_path):
    with pytest.raises(formats.FormatError, match="bonus-anchor"):
        formats.export_draft(_draft(target, "zlab"), tmp_path / "a", "deepspec")
    with pytest.raises(formats.FormatError, match="anchor-first"):
        formats.export_draft(_draft(target, "dflash"), tmp_path / "b", "zlab")
    with pytest.raises(formats.FormatError, match="Markov or confidence"):
        formats.export_draft(_draft(target, "vanilla", slot_convention=BONUS_ANCHOR, block_size=3),
                             tmp_path / "c", "specforge")
    with pytest.raises(formats.FormatError, match="3 taps"):
        formats.export_draft(_draft(target, "eagle3"), tmp_path / "d", "specforge")
    with pytest.raises(formats.FormatError, match="only written in the speculators"):
        formats.export_draft(_draft(target), tmp_path / "e", "specforge", draft_vocab=[1, 2])
    with pytest.raises(dj.ConfigError, match="pruned draft vocabulary"):
        dj.save_draft(_draft(target, draft_vocab=(1, 2, 3)), tmp_path / "f")
    assert not any((tmp_path / n).exists() for n in "abcdef")


def _edit(path, fn):
    c = _cfg(path)
    fn(c)
    json.dump(c, open(os.path.join(path, "config.json"), "w"))


def _retensor(path, drop=(), add=None):
    t = {k: v for k, v in _tensors(path).items() if k not in drop}
    t.update(add or {})
    save_file(t, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("fmt,edit,match", [
    # wrong tap count: the file's own field is named, with fc's width
    ("speculators", lambda c: c.update(aux_hidden_state_layer_ids=[1, 2]), r"aux_hidden_state_layer_ids=\[1, 2\]"),
    ("specforge", lambda c: c["dflash_config"].update(target_layer_ids=[0, 1]),
     r"dflash_config\.target_layer_ids"),
    ("zlab", lambda c: c["dflash_config"].update(target_layer_ids=[-1, 0, 1, 2]), r"fc\.weight.*4 tapped"),
    # wrong convention flag: sample_from_anchor disagrees with speculative_tokens
    ("speculators", lambda c: c.update(sample_from_anchor=False), "sample_from_anchor=false"),
    ("speculators", lambda c: c.update(sample_from_anchor="yes"), "sample_from_anchor must be true or false"),
    ("zlab", lambda c: c["dflash_config"].update(sample_from_anchor=True), "sample_from_anchor"),
    # mask token and vocab
    ("zlab", lambda c: c["dflash_config"].update(mask_token_id=V), "mask_token_id"),
    ("speculators", lambda c: c.update(draft_vocab_size=30), "no d2t"),
    ("speculators", lambda c: c["transformer_layer_config"].update(vocab_size=40),
     "draft_vocab_size=32 < vocab_size=40"),
    ("speculators", lambda c: c.update(speculators_model_type="medusa"), "speculators_model_type"),
    ("speculators", lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention"] * 2),
     "sliding_attention"),
])
def test_mismatched_checkpoint_fails_at_load_naming_the_field(target, tmp_path, fmt, edit, match):
    kind = "zlab" if fmt == "zlab" else "vanilla"
    formats.export_draft(_draft(target, kind), tmp_path, fmt)
    _edit(tmp_path, edit)
    with pytest.raises((dj.ConfigError, dj.CheckpointError), match=match):
        dj.load_draft(tmp_path, target=target)


def test_vocab_tables_must_agree(target, tmp_path):
    formats.export_draft(_draft(target), tmp_path, "speculators", draft_vocab=[1, 2, 5])
    t2d = np.zeros(V, bool)
    t2d[[1, 2, 6]] = True
    _retensor(tmp_path, add={"t2d": t2d})
    with pytest.raises(dj.CheckpointError, match="d2t and t2d disagree"):
        dj.load_draft(tmp_path)
    _retensor(tmp_path, add={"d2t": np.array([1, 1, 1], np.int64)})          # ids 1, 2, 3 vs t2d
    with pytest.raises(dj.CheckpointError, match="d2t and t2d disagree"):
        dj.load_draft(tmp_path)
    _retensor(tmp_path, add={"d2t": np.array([1, 0, -1], np.int64)})         # not ascending
    with pytest.raises(dj.CheckpointError, match="strictly ascending"):
        dj.load_draft(tmp_path)


def test_draft_must_fit_the_target(target, tmp_path):
    formats.export_draft(_draft(target), tmp_path / "sp", "speculators")
    other = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V + 8, hidden_size=H, intermediate_size=I,
                                         num_hidden_layers=T, num_attention_heads=NH, num_key_value_heads=NKV,
                                         head_dim=HD), dtype="float32")
    with pytest.raises(dj.ConfigError, match=r"transformer_layer_config\.vocab_size=32.*40"):
        dj.load_draft(tmp_path / "sp", target=other)
    shallow = dj.build_target(TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=I,
                                           num_hidden_layers=3, num_attention_heads=NH, num_key_value_heads=NKV,
                                           head_dim=HD), dtype="float32")
    with pytest.raises(dj.ConfigError, match=r"aux_hidden_state_layer_ids=\[1, 2, 3\] \(input convention"):
        dj.load_draft(tmp_path / "sp", target=shallow)


def test_shared_tensors_need_the_target(target, tmp_path):
    formats.export_draft(_draft(target, "zlab"), tmp_path, "zlab")
    with pytest.raises(dj.CheckpointError, match="embed_tokens.weight.*pass the target"):
        dj.load_draft(tmp_path)
    _retensor(tmp_path, add={"lm_head.weight": np.zeros((V, H), np.float32)})
    with pytest.raises(dj.CheckpointError, match="never store them"):
        dj.load_draft(tmp_path, target=target)


def test_specforge_legacy_head_prefix_and_sglang_spelling(target, tmp_path):
    draft = _draft(target, "gated")
    formats.export_draft(draft, tmp_path, "specforge")
    t = _tensors(tmp_path)
    _retensor(tmp_path, drop=[k for k in t if k.startswith("markov_head")],
              add={"logit_head." + k: v for k, v in t.items() if k.startswith("markov_head")})

    def hoist(c):      # SGLang normalisation: Markov keys at the top level, DeepSpec's architecture name
        for k in ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"):
            c[k] = c["dflash_config"].pop(k)
        c["architectures"] = ["Qwen3DSparkModel"]
        del c["auto_map"]
    _edit(tmp_path, hoist)
    _same_params(draft, dj.load_draft(tmp_path, target=target, dtype="float32"))


def test_specforge_eagle3_is_detected(tmp_path):
    """LlamaForCausalLMEagle3 is read as SpecForge (tests/convert/test_specforge_eagle3.py covers the rest)."""
    assert formats.detect_format({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama"}) == "specforge"


# ---- 5. the commands -----------------------------------------------------------------------------------------

def test_convert_and_inspect_commands(target, target_dir, tmp_path, capsys):
    draft = _draft(target)
    dj.save_draft(draft, tmp_path / "ds")
    assert cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "sf"), "--to", "specforge"]) == 0
    # SpecForge -> speculators needs the embedding: from --target
    with pytest.raises(SystemExit, match="pass --target"):
        cli.main(["convert", "draft", str(tmp_path / "sf"), str(tmp_path / "sp"), "--to", "speculators"])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(list(range(20))))
    assert cli.main(["convert", "draft", str(tmp_path / "sf"), str(tmp_path / "sp"), "--to", "speculators",
                     "--target", str(target_dir), "--draft-vocab", str(vocab), "--verifier", "tiny/target"]) == 0
    assert _cfg(tmp_path / "sp")["draft_vocab_size"] == 20
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "sp"), "--target", str(target_dir), "--json",
                     str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    for want in ("vLLM speculators dspark", "aux_hidden_state_layer_ids=[1, 2, 3] (input convention) = outputs "
                 "of target layers [0, 1, 2]", "anchor_first", "pruned draft vocab 20", "target check: ok",
                 "d2t", "verifier: tiny/target"):
        assert want in text, want
    info = json.load(open(tmp_path / "i.json"))
    assert info["format"] == "speculators" and info["tensors"]["t2d"] == {"shape": [V], "dtype": "BOOL"}
    assert cli.main(["inspect", str(tmp_path / "sf")]) == 0
    text = capsys.readouterr().out
    assert "SpecForge dspark" in text and "not stored (taken from the target at load): embed_tokens" in text
    assert cli.main(["inspect", str(target_dir)]) == 0
    assert "target model" in capsys.readouterr().out
    other = tmp_path / "other_target"
    other.mkdir()
    tcfg = _cfg(target_dir)
    tcfg["vocab_size"] = V + 8
    json.dump(tcfg, open(other / "config.json", "w"))
    assert cli.main(["inspect", str(tmp_path / "sp"), "--target", str(other)]) == 0
    assert "target check: does not fit" in capsys.readouterr().out
    # round trip through the command gives the original DeepSpec files back
    assert cli.main(["convert", "draft", str(tmp_path / "sf"), str(tmp_path / "ds2"), "--to", "deepspec",
                     "--target", str(target_dir)]) == 0
    for k, v in _tensors(tmp_path / "ds").items():
        assert v.tobytes() == _tensors(tmp_path / "ds2")[k].tobytes(), k


def test_command_errors(target, tmp_path):
    dj.save_draft(_draft(target), tmp_path / "ds")
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["convert", "draft", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "specforge"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["inspect", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        cli.main(["inspect", str(tmp_path / "empty")])
    os.makedirs(tmp_path / "noweights")
    json.dump(_cfg(tmp_path / "ds"), open(tmp_path / "noweights" / "config.json", "w"))
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        cli.main(["inspect", str(tmp_path / "noweights")])
    json.dump({"architectures": ["MysteryModel"]}, open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(SystemExit, match="not a draft format"):
        cli.main(["convert", "draft", str(tmp_path / "empty"), str(tmp_path / "o"), "--to", "speculators"])
    with pytest.raises(SystemExit):                      # argparse: unknown output format
        cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "o"), "--to", "onnx"])
    with pytest.raises(SystemExit, match="not empty"):
        cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "noweights"), "--to", "specforge"])
    with pytest.raises(SystemExit, match="differ"):
        cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "ds"), "--to", "specforge"])
    bad = tmp_path / "v.json"
    bad.write_text("[1, 2, \"x\"]")
    with pytest.raises(SystemExit, match="list of target token ids"):
        cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "o"), "--to", "speculators",
                  "--draft-vocab", str(bad)])
    with pytest.raises(SystemExit, match="no d2t/t2d"):
        bad.write_text("[1, 2]")
        cli.main(["convert", "draft", str(tmp_path / "ds"), str(tmp_path / "o"), "--to", "specforge",
                  "--draft-vocab", str(bad)])


def test_hand_written_zlab_config_with_nested_block_size(target, tmp_path, capsys):
    """A config shaped like a z-lab release (transformers 4 spelling, block_size inside dflash_config as in the
    newer heads, target noise), not one our writer produced."""
    draft = _draft(target, "zlab")
    formats.export_draft(draft, tmp_path, "zlab")
    json.dump({"model_type": "qwen3", "architectures": ["DFlashDraftModel"],
               "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "num_target_layers": T,
               "dflash_config": {"mask_token_id": MASK, "target_layer_ids": list(TAPS), "block_size": 4},
               "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
               "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD, "rms_norm_eps": 1e-6,
               "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 32768,
               "torch_dtype": "float32", "max_window_layers": 28, "use_sliding_window": False,
               "tie_word_embeddings": False, "transformers_version": "4.57.1"},
              open(tmp_path / "config.json", "w"))
    loaded = dj.load_draft(tmp_path, target=target)
    assert loaded.config.slot_convention == BONUS_ANCHOR and loaded.config.block_size == 3
    assert loaded.config.target_layer_ids == TAPS and loaded.dtype == jnp.float32
    _same_params(draft, loaded)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "z-lab / SpecForge DFlash dflash" in text and "4 slots, 3 drafts per block (bonus_anchor" in text
    assert "dflash_config.target_layer_ids=[0, 1, 2] (output convention)" in text
