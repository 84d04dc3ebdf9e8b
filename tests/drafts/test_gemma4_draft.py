"""Gemma4 DSpark / DFlash / Eagle3 drafts (spec §2, §5) on a tiny fp32 Gemma4 target: checkpoint names, the §8
invariants (train/infer consistency, mask, positions and softcapped aligned targets, Markov/confidence consistency,
frozen tensors) and greedy speculative decoding == target greedy decoding.

Target: V=32, H=16, 5 layers (sliding / full, window 4), nh 2, sliding nkv/hd 1/8, full (global) nkv/hd 1/16
with ``attention_k_eq_v``, per-layer inputs, softcap 5. Draft: taps [0,1,2], D=2, Bs=4, N=3, r=4, mask id 31.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from draft_calls import assert_forced_block_matches, assert_rounds_match, fwd, rows
from flax import nnx

import dspark_jax as dj
from dspark_jax.config import ConfigError
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.gemma4 import Gemma4DSparkDraft
from dspark_jax.nn.frozen import Frozen
from dspark_jax.targets.gemma4 import softcap
from dspark_jax.targets.gemma4_config import Gemma4Config

V, H, BS, N, R, MASK = 32, 16, 4, 3, 4, 31
TAPS = (0, 1, 2)
CAP = 5.0
TOL = dict(atol=1e-5, rtol=1e-5)
LAYERS = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention")


def target_config(**changes) -> Gemma4Config:
    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, layer_types=LAYERS, sliding_window=4, final_logit_softcapping=CAP,
              hidden_size_per_layer_input=4, vocab_size_per_layer_input=V, initializer_range=0.5,
              eos_token_id=None)
    kw.update(changes)
    return Gemma4Config(**kw)


def draft_config(kind="vanilla", **changes) -> DraftConfig:
    kw = dict(block_size=BS, mask_token_id=MASK, target_layer_ids=TAPS, num_anchors=N, num_draft_layers=2,
              markov_rank=R, markov_head_type="vanilla", enable_confidence_head=True, dtype="float32")
    if kind == "dflash":
        kw.update(markov_rank=0, enable_confidence_head=False)
    kw.update(changes)
    return DraftConfig(**kw)


@pytest.fixture(scope="module")
def target():
    return dj.build_target(target_config(), seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    return {kind: dj.build_draft(target, draft_config(kind), seed=3 + i)
            for i, kind in enumerate(("vanilla", "dflash"))}


@pytest.fixture(scope="module")
def batch(target, run_target):
    """conftest.py's ``batch`` over this target (conftest's ``run_target`` taps layers (0, 1, 2) = TAPS)."""
    ids = jnp.asarray(np.random.default_rng(7).integers(0, MASK, (2, 12)), jnp.int32)
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                           [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]], jnp.int32)
    taps, last, logits = run_target(target, ids)
    return dict(input_ids=ids, loss_mask=loss_mask, target_hidden=taps, target_last_hidden=last, logits=logits)


# ---- architecture and checkpoint --------------------------------------------------------------------------------
@pytest.mark.parametrize("k_eq_v", [True, False])
def test_checkpoint_keys_and_shapes(k_eq_v, tmp_path):
    # without k_eq_v transformers ignores num_global_key_value_heads: full layers keep num_key_value_heads (2)
    tc = target_config(attention_k_eq_v=k_eq_v, num_key_value_heads=1 if k_eq_v else 2)
    d = dj.build_draft(dj.build_target(tc, seed=1), draft_config())
    assert isinstance(d, Gemma4DSparkDraft)
    dj.save_draft(d, tmp_path)
    from safetensors.numpy import load_file

    shapes = {k: v.shape for k, v in load_file(tmp_path / "model.safetensors").items()}
    nkv = 1 if k_eq_v else 2
    want = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 3 * H),
            "hidden_norm.weight": (H,), "norm.weight": (H,), "markov_head.markov_w1.weight": (V, R),
            "markov_head.markov_w2.weight": (V, R), "confidence_head.proj.weight": (1, H + R),
            "confidence_head.proj.bias": (1,)}
    for i in range(2):
        p = f"layers.{i}."
        want.update({p + n + ".weight": (H,) for n in ("input_layernorm", "post_attention_layernorm",
                                                        "pre_feedforward_layernorm", "post_feedforward_layernorm")})
        want.update({p + "layer_scalar": (1,), p + "self_attn.q_proj.weight": (2 * 16, H),
                     p + "self_attn.k_proj.weight": (nkv * 16, H), p + "self_attn.o_proj.weight": (H, 2 * 16),
                     p + "self_attn.q_norm.weight": (16,), p + "self_attn.k_norm.weight": (16,),
                     p + "mlp.gate_proj.weight": (32, H), p + "mlp.up_proj.weight": (32, H),
                     p + "mlp.down_proj.weight": (H, 32)})
        if not k_eq_v:
            want[p + "self_attn.v_proj.weight"] = (nkv * 16, H)
    assert shapes == want
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4DSparkModel"] and cfg["model_type"] == "gemma4_text"
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["num_hidden_layers"] == 2
    assert cfg["tie_word_embeddings"] is False and cfg["final_logit_softcapping"] == CAP
    assert (cfg["global_head_dim"], cfg["attention_k_eq_v"], cfg["target_layer_ids"]) == (16, k_eq_v, list(TAPS))


@pytest.mark.parametrize("kind", ["vanilla", "dflash"])
def test_save_load_round_trip_bit_identical(kind, drafts, tmp_path):
    d = drafts[kind]
    dj.save_draft(d, tmp_path / "a")
    again = dj.load_draft(tmp_path / "a")
    assert isinstance(again, Gemma4DSparkDraft)
    a = nnx.to_flat_state(nnx.state(d, nnx.Variable))
    b = nnx.to_flat_state(nnx.state(again, nnx.Variable))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(p))
    # a loaded checkpoint is written back unchanged (DeepSpec -> here -> DeepSpec)
    dj.save_draft(again, tmp_path / "b")
    assert (tmp_path / "a/config.json").read_text() == (tmp_path / "b/config.json").read_text()
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_target_only_config_fields_survive_a_round_trip(drafts, tmp_path):
    """A DeepSpec config copied from a target with MoE / per-layer-input fields keeps them verbatim; the draft
    itself has neither (DeepSpec asserts them off for draft layers)."""
    dj.save_draft(drafts["vanilla"], tmp_path / "a")
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    cfg.update(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=8,
               hidden_size_per_layer_input=4, per_layer_config={"5": {"head_dim": 16, "num_key_value_heads": 1}})
    (tmp_path / "a/config.json").write_text(json.dumps(cfg))
    d = dj.load_draft(tmp_path / "a")
    assert not d.config.arch.enable_moe_block and d.config.arch.hidden_size_per_layer_input == 0
    out = d.config.to_hf_dict()
    assert (out["enable_moe_block"], out["num_experts"], out["hidden_size_per_layer_input"]) == (True, 8, 4)


def test_frozen_tensors_and_trainable_set(drafts, target):
    d = drafts["vanilla"]
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(d, nnx.Param))}
    frozen = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(d, Frozen))}
    assert frozen == {"embed_tokens", "lm_head", "layers.0.layer_scalar", "layers.1.layer_scalar"}
    assert not any("v_proj" in p for p in trainable)          # k_eq_v: values are the key projection
    np.testing.assert_array_equal(np.asarray(d.embed_tokens[...]), np.asarray(target.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(np.asarray(d.lm_head[...]), np.asarray(target.output_embedding()))


def test_embedding_is_scaled_and_logits_softcapped(drafts, target, batch):
    d = drafts["vanilla"]
    ids = batch["input_ids"]
    np.testing.assert_allclose(d.embed(ids), target.embed(ids), **TOL)
    h = jax.random.normal(jax.random.key(0), (3, H)) * 10
    np.testing.assert_allclose(d.base_logits(h), target.compute_logits(h), **TOL)
    assert np.abs(np.asarray(d.base_logits(h))).max() <= CAP


# ---- spec §8.4 / §8.6: mask, positions, aligned (softcapped) target logits -------------------------------------
def test_blocks_see_only_context_before_their_anchor(drafts, batch):
    d = drafts["vanilla"]
    anchors, keep = jnp.array([[1, 5, 9], [2, 6, 0]]), jnp.array([[True, True, True], [True, True, False]])
    base = fwd(d, batch, anchors, keep)
    for n in range(N):
        alone = fwd(d, batch, anchors[:, n:n + 1], keep[:, n:n + 1])
        np.testing.assert_allclose(alone.draft_hidden[:, 0], base.draft_hidden[:, n], **TOL)
    taps = np.asarray(batch["target_hidden"])
    for pos in (4, 5, 8):      # changing the taps at pos affects exactly the kept blocks with anchor > pos
        t2 = taps.copy()
        t2[:, pos] += 3.0
        out = fwd(d, dict(batch, target_hidden=jnp.asarray(t2)), anchors, keep)
        moved = np.abs(np.asarray(out.draft_hidden - base.draft_hidden)).max(axis=(2, 3)) > 1e-6
        np.testing.assert_array_equal(moved, (np.asarray(anchors) > pos) & np.asarray(keep), err_msg=f"pos {pos}")
    assert np.all(np.isfinite(np.asarray(base.draft_logits)))


def test_labels_and_softcapped_aligned_target_logits(drafts, batch):
    d = drafts["vanilla"]
    anchors, keep = jnp.array([[1, 5, 10], [2, 6, 0]]), jnp.array([[True, True, True], [True, True, False]])
    out = fwd(d, batch, anchors, keep)
    ids, logits = np.asarray(batch["input_ids"]), np.asarray(batch["logits"])
    for b in range(2):
        for n in range(N):
            if not keep[b, n]:
                continue
            for k in range(BS):
                safe = min(int(anchors[b, n]) + k + 1, 11)
                assert int(out.target_ids[b, n, k]) == ids[b, safe]
                # the draft's copy of the head + softcap reproduces the target's own logits for that label
                np.testing.assert_allclose(out.target_logits[b, n, k], logits[b, safe - 1], **TOL)
    u = d.markov_u(out.draft_hidden, jnp.concatenate([rows(batch["input_ids"], anchors[:, 0])[:, None],
                                                      out.target_ids[:, 0, :-1]], -1))
    want = softcap(jnp.einsum("bkh,vh->bkv", out.draft_hidden[:, 0], d.lm_head[...]), CAP) + d.markov_head.bias(u)
    np.testing.assert_allclose(out.draft_logits[:, 0], want, **TOL)   # Markov bias added after the cap


# ---- spec §8.5 train/infer consistency -----------------------------------------------------------------------
def test_train_infer_consistency_empty_and_incremental_cache(drafts, batch):
    assert_rounds_match(drafts["vanilla"], batch, TOL)


# ---- spec §8.8 / §8.9: Markov consistency, confidence non-anticipation -----------------------------------------
@pytest.mark.parametrize("kind", ["vanilla", "dflash"])
def test_forced_proposal_equals_teacher_forced_block(kind, drafts, target, batch, run_target):
    assert_forced_block_matches(drafts[kind], kind, batch, run_target, target, TOL)


def test_confidence_is_non_anticipating(drafts, batch):
    d = drafts["vanilla"]
    anchors, keep = jnp.array([[1, 6, 0], [2, 7, 0]]), jnp.array([[True, True, False], [True, True, False]])
    ids = np.asarray(batch["input_ids"])
    base = np.asarray(fwd(d, batch, anchors, keep).confidence_logits[0, 0])
    for k in range(BS):
        changed = ids.copy()
        changed[0, 1 + k + 1] = (changed[0, 1 + k + 1] + 7) % MASK
        conf = np.asarray(fwd(d, dict(batch, input_ids=jnp.asarray(changed)), anchors, keep).confidence_logits[0, 0])
        np.testing.assert_array_equal(conf[:k + 1], base[:k + 1], err_msg=f"label of slot {k} leaked")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_chunked_loss_applies_the_softcap(drafts, batch, impl):
    """The vocab-chunked loss (no [.., V] logits) rebuilds the softcapped logits: loss, metrics and gradients equal
    the materialised-logits loss (fp32, <= 1e-5); impl=pallas runs the fused kernels in interpret mode here."""
    d = drafts["vanilla"]
    anchors, keep = jnp.array([[1, 5, 0], [2, 0, 0]]), jnp.array([[True, True, False], [True, False, False]])

    @nnx.jit(static_argnames=("chunk",))
    def loss_and_grads(m, chunk):
        def f(m):
            out = m.train_forward(batch["input_ids"], batch["loss_mask"], batch["target_hidden"],
                                  batch["target_last_hidden"], anchors, keep, materialize_logits=chunk is None)
            assert out.softcap == CAP
            return dj.dspark_loss(out, m.config, vocab_chunk=chunk, impl=impl)
        return nnx.value_and_grad(f, has_aux=True)(m)

    (loss, metrics), grads = loss_and_grads(d, None)
    (loss_c, metrics_c), grads_c = loss_and_grads(d, 8)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss_c, loss, **TOL)
    for k in metrics:
        np.testing.assert_allclose(metrics_c[k], metrics[k], **TOL, err_msg=k)
    flat, flat_c = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_c))
    assert flat.keys() == flat_c.keys()
    for k, v in flat.items():
        assert np.all(np.isfinite(np.asarray(v.get_value())))
        np.testing.assert_allclose(flat_c[k].get_value(), v.get_value(), **TOL, err_msg=str(k))


def test_bad_configs_are_config_errors(target):
    with pytest.raises(ConfigError, match="last layer"):
        dj.build_draft(target, draft_config(target_layer_ids=(0, 1, 4)))
    with pytest.raises(ConfigError, match="exactly 5"):      # Eagle3: 5 taps below the last layer
        dj.build_draft(target, DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=(0, 1, 2),
                                           num_draft_layers=1, dtype="float32"))


# ---- spec §8.1 greedy equivalence -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,threshold", [("vanilla", 0.0), ("vanilla", 0.5), ("dflash", 0.0)])
def test_greedy_speculative_equals_target_greedy(kind, threshold, drafts, target):
    prompts = [[3, 4, 5, 6, 7, 8], [9, 1, 30]]
    want = dj.generate(target, prompts, max_new_tokens=24, temperature=0.0, stop_token_ids=())
    got = dj.speculative_generate(target, drafts[kind], prompts, max_new_tokens=24, temperature=0.0,
                                  threshold=threshold, stop_token_ids=())
    np.testing.assert_array_equal(got.tokens, want.tokens)
    if threshold == 0.0:     # drafts are accepted here (the tiny target's greedy text repeats), not only rejected
        assert got.stats["tau"] > 1.5


# ---- Eagle3 (Gemma4Eagle3Model) ------------------------------------------------------------------------------
E3_TAPS = (0, 1, 2, 3, 4)
T_E3 = 3


@pytest.fixture(scope="module")
def e3(target):
    """(7-layer target, its Eagle3 draft, train batch, TTT forward output): 5 taps must stay below the last layer."""
    t7 = dj.build_target(target_config(num_hidden_layers=7, layer_types=LAYERS + ("sliding_attention",
                                                                                  "full_attention")), seed=0)
    d = dj.build_draft(t7, DraftConfig(architecture="Qwen3Eagle3Model", target_layer_ids=E3_TAPS, num_draft_layers=1,
                                       ttt_length=T_E3, dtype="float32"), seed=5)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, MASK, (2, 10)), jnp.int32)
    out = t7(ids, tap_layer_ids=E3_TAPS)
    b = dict(input_ids=ids, loss_mask=jnp.ones((2, 10), jnp.int32), target_hidden=out.taps,
             target_last_hidden=out.last_hidden, logits=out.logits)
    train = nnx.jit(lambda m, a, c, e, f: m.train_forward(a, c, e, f))(d, ids, b["loss_mask"], out.taps,
                                                                       out.last_hidden)
    return t7, d, b, train


def test_eagle3_checkpoint_keys_round_trip_and_softcapped_targets(e3, tmp_path):
    from safetensors.numpy import load_file

    t7, d, b, train = e3
    assert d.config.architecture == "Gemma4Eagle3Model"
    dj.save_draft(d, tmp_path / "a")
    shapes = {k: v.shape for k, v in load_file(tmp_path / "a/model.safetensors").items()}
    want = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 5 * H), "norm.weight": (H,),
            "layers.0.layer_scalar": (1,), "layers.0.self_attn.q_proj.weight": (2 * 16, 2 * H),
            "layers.0.self_attn.k_proj.weight": (16, 2 * H), "layers.0.self_attn.o_proj.weight": (H, 2 * 16),
            "layers.0.self_attn.q_norm.weight": (16,), "layers.0.self_attn.k_norm.weight": (16,),
            "layers.0.mlp.gate_proj.weight": (32, H), "layers.0.mlp.up_proj.weight": (32, H),
            "layers.0.mlp.down_proj.weight": (H, 32)}
    want.update({f"layers.0.{n}.weight": (H,) for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm",
                                                         "pre_feedforward_layernorm", "post_feedforward_layernorm")})
    assert shapes == want
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert (cfg["architectures"], cfg["ttt_length"], cfg["draft_num_hidden_layers"]) == (["Gemma4Eagle3Model"], T_E3, 1)
    again = dj.load_draft(tmp_path / "a")
    dj.save_draft(again, tmp_path / "b")
    assert (tmp_path / "a/config.json").read_text() == (tmp_path / "b/config.json").read_text()
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    # step j's target at position t is the target's own (softcapped) logits at t+j+1
    for j in range(T_E3):
        np.testing.assert_allclose(train.target_logits[j, :, :10 - j - 1], b["logits"][:, j + 1:], **TOL)
    assert np.abs(np.asarray(train.draft_logits)).max() <= CAP
    # the vocab-chunked Eagle3 loss applies the same cap: equal to the loss on the materialised logits
    chunked = dataclasses.replace(train, draft_logits=None, target_logits=None)
    assert train.softcap == CAP
    for m_ref, m_chk in zip(dj.eagle3_loss(train, d.config), dj.eagle3_loss(chunked, d.config, vocab_chunk=8)):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, **TOL), m_ref, m_chk)


def test_eagle3_step0_equals_cached_inference_and_chain_equals_ttt(e3):
    t7, d, b, train = e3
    from dspark_jax.drafts.eagle3 import shift_left

    taps, ids = b["target_hidden"], b["input_ids"]
    toks = shift_left(ids, 1)
    cache = d.init_cache(2, 16)
    _, hid = nnx.jit(lambda m, c, x, y, n: m.forward_cached(c, m.project_features(x), y, n))(
        d, cache, taps, toks, jnp.full((2,), 10, jnp.int32))
    np.testing.assert_allclose(d.compute_logits(hid), train.draft_logits[0], **TOL)
    # chain drafting from the committed position t with the data forced equals TTT step j at t
    t0 = 4
    forced = shift_left(ids, t0 + 2)[:, :T_E3]

    @nnx.jit
    def chain(m, x, y, n, f):
        cache, last = m.extend(m.init_cache(2, 16), x, y, n)
        return m.propose(cache, last, jax.random.key(0), forced_tokens=f)

    prop = chain(d, taps, toks, jnp.full((2,), t0 + 1, jnp.int32), forced)
    for j in range(T_E3):
        np.testing.assert_allclose(prop.logits[:, j], train.draft_logits[j, :, t0], **TOL)
    assert prop.cache.lengths.tolist() == [t0 + 1] * 2


def test_eagle3_greedy_speculative_equals_target_greedy(e3):
    t7, d, _, _ = e3
    prompts = [[3, 4, 5, 6, 7, 8], [9, 1, 30]]
    want = dj.generate(t7, prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=())
    got = dj.speculative_generate(t7, d, prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=())
    np.testing.assert_array_equal(got.tokens, want.tokens)
