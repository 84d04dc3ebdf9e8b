"""DSpark training block attention (spec §1.5): the dense reference, the structured-mask dispatch and the Pallas
kernels (TPU and GPU drivers, CPU interpret mode) against the reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import kernels
from dspark_jax.drafts.backbone import training_mask
from dspark_jax.kernels import _dispatch
from dspark_jax.kernels.block_attention import block_mask, dspark_block_attention_reference
from dspark_jax.kernels.block_attention_pallas import block_attention_pallas


def _case(seed, b, n, bs, s, nh, nkv, hd, anchors, keep, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, n * bs, nh, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s + n * bs, nkv, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s + n * bs, nkv, hd)), dtype)
    w = jnp.asarray(rng.normal(size=(b, n * bs, nh, hd)), jnp.float32)      # cotangent for the gradient check
    return q, k, v, jnp.asarray(anchors, jnp.int32), jnp.asarray(keep, bool), w


def _loss_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v), jax.jit(
        lambda q, k, v: fn(q, k, v))(q, k, v)


def test_block_mask_matches_training_mask():
    anchors = jnp.asarray([[0, 4, 9], [3, 0, 0]], jnp.int32)
    keep = jnp.asarray([[True, False, True], [True, False, False]])
    np.testing.assert_array_equal(np.asarray(block_mask(anchors, keep, 11, 3)),
                                  np.asarray(training_mask(anchors, keep, 11, 3)))


def test_structured_mask_dispatch_equals_dense():
    q, k, v, a, keep, _ = _case(0, 2, 3, 2, 7, 4, 2, 8, [[1, 3, 6], [0, 2, 0]], [[1, 1, 1], [1, 1, 0]])
    dense = kernels.attention(q, k, v, training_mask(a, keep, 7, 2), 0.4, impl="xla")
    structured = kernels.attention(q, k, v, kernels.DSparkBlockMask(a, keep, 2), 0.4, impl="xla")
    # the structured XLA path is the split form (no block-block tiles): same math, another summation order
    np.testing.assert_allclose(np.asarray(structured), np.asarray(dense), atol=1e-6, rtol=1e-6)
    ct = jax.random.normal(jax.random.key(3), q.shape)
    grads = [jax.grad(lambda q, k, v: jnp.sum(ct * kernels.attention(q, k, v, m, 0.4, impl="xla")),
                      argnums=(0, 1, 2))(q, k, v)
             for m in (training_mask(a, keep, 7, 2), kernels.DSparkBlockMask(a, keep, 2))]
    for g_dense, g_split in zip(*grads):
        np.testing.assert_allclose(np.asarray(g_split), np.asarray(g_dense), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        kernels.attention(q, k, v, kernels.DSparkBlockMask(a, keep, 2), 0.4, impl="triton")


def test_resolve(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_IMPL, raising=False)
    assert _dispatch.resolve("xla") == ("xla", None)
    if jax.default_backend() == "cpu":
        assert _dispatch.resolve("auto") == ("xla", None)
        assert _dispatch.resolve("pallas") == ("pallas", "tpu-interpret")
        monkeypatch.setenv(_dispatch.ENV_INTERPRET, "gpu")
        assert _dispatch.resolve("pallas") == ("pallas", "gpu-interpret")
        monkeypatch.setenv(_dispatch.ENV_IMPL, "pallas")
        assert _dispatch.resolve("auto") == ("pallas", "gpu-interpret")
    monkeypatch.setenv(_dispatch.ENV_IMPL, "xla")
    assert _dispatch.resolve("auto") == ("xla", None)
    assert _dispatch.resolve("pallas")[0] == "pallas"               # an explicit impl wins over the env var
    monkeypatch.setenv(_dispatch.ENV_IMPL, "cuda")
    with pytest.raises(ValueError):
        _dispatch.resolve("auto")


CASES = {
    # odd everything: S=13, 3 blocks of 3, one dropped block, anchor 0 (sees no context), tiles 4 queries x 8 keys
    "odd": dict(b=2, n=3, bs=3, s=13, nh=4, nkv=2, hd=8, anchors=[[0, 5, 11], [2, 7, 0]],
                keep=[[1, 1, 1], [1, 0, 0]], tiles=(4, 8)),
    # one KV head (g=3), a batch row whose blocks are all dropped, block keys spanning several key tiles
    "mqa_all_dropped": dict(b=2, n=4, bs=5, s=6, nh=3, nkv=1, hd=4, anchors=[[1, 2, 4, 5], [0, 0, 0, 0]],
                            keep=[[1, 1, 0, 1], [0, 0, 0, 0]], tiles=(8, 8)),
}


@pytest.mark.parametrize("target,case,dtype", [
    ("tpu-interpret", "odd", jnp.float32),
    ("tpu-interpret", "mqa_all_dropped", jnp.bfloat16),
    ("gpu-interpret", "odd", jnp.float32),
    pytest.param("tpu-interpret", "mqa_all_dropped", jnp.float32, marks=pytest.mark.slow),
    pytest.param("tpu-interpret", "odd", jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("gpu-interpret", "mqa_all_dropped", jnp.bfloat16, marks=pytest.mark.slow),
])
def test_pallas_matches_reference(target, case, dtype):
    cfg = dict(CASES[case])
    tq, tk = cfg.pop("tiles")
    bs = cfg["bs"]
    q, k, v, a, keep, w = _case(1, cfg["b"], cfg["n"], bs, cfg["s"], cfg["nh"], cfg["nkv"], cfg["hd"],
                                cfg["anchors"], cfg["keep"], dtype)
    ref = lambda q, k, v: dspark_block_attention_reference(q, k, v, a, keep, 0.3, block_size=bs)
    pal = lambda q, k, v: block_attention_pallas(q, k, v, a, keep, 0.3, block_size=bs, target=target,
                                                 block_q=tq, block_k=tk)
    (l_ref, g_ref), o_ref = _loss_and_grads(ref, q, k, v, w)
    (l_pal, g_pal), o_pal = _loss_and_grads(pal, q, k, v, w)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert o_pal.dtype == dtype and o_pal.shape == q.shape
    np.testing.assert_allclose(np.asarray(o_pal, np.float32), np.asarray(o_ref, np.float32), atol=tol, rtol=0)
    for name, gp, gr in zip("qkv", g_pal, g_ref):
        np.testing.assert_allclose(np.asarray(gp, np.float32), np.asarray(gr, np.float32), atol=tol, rtol=0,
                                   err_msg=f"d{name}")
    # dropped blocks return exactly zero
    dropped = ~np.repeat(np.asarray(keep), bs, axis=1)
    assert np.all(np.asarray(o_pal, np.float32)[dropped] == 0.0)


def test_tile_tables_cover_visible_pairs_and_skip_the_rest():
    """Every (query tile, key tile) pair with a visible entry is listed (both directions); far fewer than all."""
    from dspark_jax.kernels import block_attention_pallas as bap
    b, n, bs, s, tq, tk = 2, 16, 7, 200, 16, 16
    rng = np.random.default_rng(3)
    anchors = jnp.asarray(np.sort(rng.integers(0, s, size=(b, n)), axis=1), jnp.int32)
    keep = jnp.asarray(rng.random((b, n)) < 0.8)
    c = bap.plan((b, n * bs, 2, 4), (b, s + n * bs, 1, 4), bs, "tpu", block_q=tq, block_k=tk)
    tabs = jax.jit(lambda a, kp: bap.tables(*bap.query_info(a, kp, c, s, bs), c))(anchors, keep)
    tabs = {name: np.asarray(x) for name, x in tabs.items()}
    dense = np.asarray(block_mask(anchors, keep, s, bs))                     # [B, Q, S + Q]
    s_p = -(-s // tk) * tk
    nq = n * bs
    padded = np.zeros((b, c.nqt * tq, c.nkt * tk), bool)
    padded[:, :nq, :s] = dense[:, :, :s]
    padded[:, :nq, s_p:s_p + nq] = dense[:, :, s:]
    need = padded.reshape(b, c.nqt, tq, c.nkt, tk).any(axis=(2, 4))          # [B, nqt, nkt]
    kv_t = tabs["kv_tiles"].reshape(b, c.nqt, c.ns)
    kv_n = tabs["kv_counts"].reshape(b, c.nqt)
    q_t = tabs["q_tiles"].reshape(b, c.nkt, c.nsq)
    q_n = tabs["q_counts"].reshape(b, c.nkt)
    for bi in range(b):
        for i in range(c.nqt):
            listed = set(kv_t[bi, i, :kv_n[bi, i]].tolist())
            assert set(np.nonzero(need[bi, i])[0].tolist()) <= listed
        for j in range(c.nkt):
            listed = set(q_t[bi, j, :q_n[bi, j]].tolist())
            assert set(np.nonzero(need[bi, :, j])[0].tolist()) <= listed
    assert kv_n.sum() <= need.sum() + 2 * b * c.nqt                          # skips nearly all invisible pairs
    assert kv_n.sum() < 0.7 * b * c.nqt * c.nkt


@pytest.mark.parametrize("target,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_real_backends(target, platform):
    """Runs the Mosaic / Triton lowering (not the device compilers) of fwd+bwd at a head_dim-128 GQA shape."""
    from dspark_jax.kernels.ragged_attention_pallas import ragged_attention_pallas
    sds = jax.ShapeDtypeStruct
    b, n, bs, s, nh, nkv, hd = 1, 16, 7, 300, 8, 2, 128
    q, k = sds((b, n * bs, nh, hd), jnp.bfloat16), sds((b, s + n * bs, nkv, hd), jnp.bfloat16)
    a, kp = sds((b, n), jnp.int32), sds((b, n), jnp.bool_)
    loss = lambda q, k, v, a, kp: jnp.sum(block_attention_pallas(q, k, v, a, kp, 0.1, block_size=bs,
                                                                 target=target).astype(jnp.float32))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    jax.export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=[platform], disabled_checks=checks)(q, k, k, a, kp)
    t, r, c = 24, 6, 1000
    i = sds((t,), jnp.int32)
    fn = lambda q, kc, vc, row, ks, kl: ragged_attention_pallas(q, kc, vc, row, ks, kl, 0.1, target=target)
    jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        sds((t, nh, hd), jnp.bfloat16), sds((r, c, nkv, hd), jnp.bfloat16), sds((r, c, nkv, hd), jnp.bfloat16), i, i, i)


@pytest.mark.slow
def test_draft_training_through_the_kernel_matches_xla():
    """DSparkDraft.train_forward picks the block kernel through the dispatch: loss and gradients with
    attention_impl="pallas" (CPU: interpret mode) equal the XLA path's."""
    from flax import nnx

    from dspark_jax.config import TargetConfig
    from dspark_jax.drafts.build import build_draft
    from dspark_jax.drafts.config import DraftConfig
    from dspark_jax.targets import build_target
    from dspark_jax.train.loss import dspark_loss

    target = build_target(TargetConfig(model_type="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=8, initializer_range=0.5), dtype="float32", seed=0)
    cfg = DraftConfig(block_size=3, mask_token_id=31, target_layer_ids=(0, 1), num_anchors=3, num_draft_layers=1,
                      markov_rank=2, markov_head_type="vanilla", enable_confidence_head=True, dtype="float32")
    rng = np.random.default_rng(0)
    b, s = 2, 11
    ids = jnp.asarray(rng.integers(0, 31, size=(b, s)), jnp.int32)
    loss_mask = jnp.ones((b, s), jnp.int32)
    taps = jnp.asarray(rng.normal(size=(b, s, 2 * 16)), jnp.float32)
    last = jnp.asarray(rng.normal(size=(b, s, 16)), jnp.float32)
    anchors = jnp.asarray([[1, 4, 8], [0, 6, 0]], jnp.int32)
    keep = jnp.asarray([[True, True, True], [True, True, False]])

    @nnx.jit
    def loss_and_grads(draft):
        def f(m):
            return dspark_loss(m.train_forward(ids, loss_mask, taps, last, anchors, keep), m.config)[0]
        return nnx.value_and_grad(f)(draft)

    results = {}
    for impl in ("xla", "pallas"):
        draft = build_draft(target, cfg, seed=3, attention_impl=impl)
        loss, grads = loss_and_grads(draft)
        results[impl] = (float(loss), {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)})
    assert abs(results["xla"][0] - results["pallas"][0]) < 1e-5
    for path, g in results["xla"][1].items():
        np.testing.assert_allclose(results["pallas"][1][path], g, atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_sharded_batch_and_heads_run_per_shard():
    """Under a jit whose inputs are sharded over batch and kv heads, the kernel runs per shard (no all-gather)
    and matches the reference, forward and gradients."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py fakes 8 CPU devices)")
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    q, k, v, a, keep, w = _case(7, 2, 3, 3, 13, 4, 2, 8, [[0, 5, 11], [2, 7, 0]], [[1, 1, 1], [1, 0, 1]])
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    qs, ks, vs = put(q, "data", None, "tensor"), put(k, "data", None, "tensor"), put(v, "data", None, "tensor")
    a_s, keep_s = put(a, "data"), put(keep, "data")

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))

    f = loss(lambda q, k, v: block_attention_pallas(q, k, v, a_s, keep_s, 0.3, block_size=3, target="tpu-interpret",
                                                    block_q=4, block_k=8))
    l_pal, g_pal = f(qs, ks, vs)
    l_ref, g_ref = loss(lambda q, k, v: dspark_block_attention_reference(q, k, v, a, keep, 0.3, block_size=3))(q, k, v)
    np.testing.assert_allclose(float(l_pal), float(l_ref), atol=1e-4)
    for gp, gr in zip(g_pal, g_ref):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gr), atol=2e-5, rtol=0)
    assert tuple(g_pal[0].sharding.spec)[:1] == ("data",)
    assert "all-gather" not in f.lower(qs, ks, vs).compile().as_text()


def test_packed_rows_context_start():
    """Packed rows: block n sees context [ctx_start[n], anchor) only. The XLA split path (forward) and the Pallas
    kernel (TPU driver, interpret mode; forward and gradients) equal the dense reference with that mask."""
    cfg = dict(CASES["odd"])
    tq, tk = cfg.pop("tiles")
    bs = cfg["bs"]
    q, k, v, a, keep, w = _case(2, cfg["b"], cfg["n"], bs, cfg["s"], cfg["nh"], cfg["nkv"], cfg["hd"],
                                cfg["anchors"], cfg["keep"])
    lo = jnp.asarray([[0, 3, 9], [1, 4, 0]], jnp.int32)      # anchors [[0, 5, 11], [2, 7, 0]]
    mask = np.asarray(block_mask(a, keep, cfg["s"], bs, lo))
    assert not mask[0, bs:2 * bs, :3].any() and mask[0, bs:2 * bs, 3:5].all()
    ref = lambda q, k, v: dspark_block_attention_reference(q, k, v, a, keep, 0.3, block_size=bs, ctx_start=lo)
    split = lambda q, k, v: kernels.attention(q, k, v, kernels.DSparkBlockMask(a, keep, bs, lo), 0.3, impl="xla")
    pal = lambda q, k, v: block_attention_pallas(q, k, v, a, keep, 0.3, block_size=bs, target="tpu-interpret",
                                                 block_q=tq, block_k=tk, ctx_start=lo)
    (l_ref, g_ref), o_ref = _loss_and_grads(ref, q, k, v, w)
    np.testing.assert_allclose(np.asarray(jax.jit(split)(q, k, v)), np.asarray(o_ref), atol=2e-5, rtol=0)
    (_, g), o = _loss_and_grads(pal, q, k, v, w)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5, rtol=0)
    for name, gp, gr in zip("qkv", g, g_ref):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gr), atol=2e-5, rtol=0, err_msg=f"d{name}")
