"""Ragged verify/decode attention: the XLA reference against a per-token numpy loop, and the Pallas kernels
(interpret mode on CPU) against the reference."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import kernels
from dspark_jax.kernels.ragged_attention import ragged_attention_reference


def _naive(q, kc, vc, row, kv_start, kv_len, scale):
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    t, nh, hd = q.shape
    nkv = kc.shape[2]
    g = nh // nkv
    out = np.zeros((t, nh, hd))
    for i in range(t):
        if row[i] < 0:
            continue
        lo, hi = max(int(kv_start[i]), 0), min(int(kv_len[i]), kc.shape[1])
        if hi <= lo:
            continue
        for h in range(nh):
            k = kc[row[i], lo:hi, h // g]
            v = vc[row[i], lo:hi, h // g]
            s = k @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v
    return out


def _case(seed, t, r, c, nh, nkv, hd, dtype=jnp.float32, window=False):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(t, nh, hd)), dtype)
    kc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), dtype)
    vc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), dtype)
    row = rng.integers(-1, r, size=t).astype(np.int32)
    kv_len = rng.integers(0, c + 1, size=t).astype(np.int32)
    kv_len[:2] = [0, c][:t]                               # an empty token and a full one
    kv_start = rng.integers(0, c, size=t).astype(np.int32) if window else None
    return q, kc, vc, row, kv_len, kv_start


@pytest.mark.parametrize("t,r,c,nh,nkv,hd,window", [(9, 3, 13, 4, 2, 8, False), (6, 2, 5, 3, 1, 4, True),
                                                    (1, 1, 1, 2, 2, 8, False)])
def test_reference_matches_loop(t, r, c, nh, nkv, hd, window):
    q, kc, vc, row, kv_len, kv_start = _case(0, t, r, c, nh, nkv, hd, window=window)
    out = ragged_attention_reference(q, kc, vc, jnp.asarray(row), jnp.asarray(kv_len), 0.3,
                                     kv_start=None if kv_start is None else jnp.asarray(kv_start))
    ks = np.zeros(t, np.int32) if kv_start is None else kv_start
    want = _naive(q, kc, vc, row, ks, kv_len, 0.3)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=0)
    assert out.shape == q.shape and out.dtype == q.dtype
    dead = (row < 0) | (np.minimum(kv_len, c) <= ks)
    assert np.all(np.asarray(out)[dead] == 0.0)


def test_reference_matches_dense_attention_causal_verify():
    # Two rows verifying 3 tokens each causally at positions 4..6 == dense causal attention over each row.
    rng = np.random.default_rng(1)
    r, c, nh, nkv, hd = 2, 8, 4, 2, 8
    kc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(r, 3, nh, hd)), jnp.float32)
    pos = np.array([4, 5, 6])
    mask = jnp.asarray(np.arange(c)[None, None, :] <= pos[None, :, None]).repeat(r, 0)
    want = kernels.attention_reference(q, kc, vc, mask, 0.5)
    out = ragged_attention_reference(q.reshape(6, nh, hd), kc, vc, jnp.repeat(jnp.arange(r), 3),
                                     jnp.tile(jnp.asarray(pos + 1), r), 0.5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want).reshape(6, nh, hd), atol=2e-6)


def test_reference_chunked_path_and_grad(monkeypatch):
    mod = importlib.import_module("dspark_jax.kernels.ragged_attention_xla")
    q, kc, vc, row, kv_len, _ = _case(2, 7, 2, 6, 2, 1, 4)
    args = (jnp.asarray(row), jnp.asarray(kv_len), 0.7)
    full = ragged_attention_reference(q, kc, vc, *args)
    monkeypatch.setattr(mod, "_GATHER_BUDGET_BYTES", 1)
    chunked = ragged_attention_reference(q, kc, vc, *args)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(ragged_attention_reference(q, k, v, *args) ** 2), (0, 1, 2))(q, kc, vc)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_dispatch_rejects_unknown_impl():
    q, kc, vc, row, kv_len, _ = _case(3, 2, 1, 3, 2, 1, 4)
    with pytest.raises(ValueError, match="impl"):
        kernels.ragged_attention(q, kc, vc, jnp.asarray(row), jnp.asarray(kv_len), 1.0, impl="cuda")
    out = kernels.ragged_attention(q, kc, vc, jnp.asarray(row), jnp.asarray(kv_len), 1.0, impl="xla")
    assert out.shape == q.shape


# ---- Pallas kernels (CPU interpret mode) against the reference ----------------------------------------------
from dspark_jax.kernels.ragged_attention_pallas import ragged_attention_pallas  # noqa: E402


def _verify_layout(seed, lens, r, c, nh, nkv, hd, dtype):
    """Scheduler-like batch: row i verifies ``lens[i]`` tokens causally at the end of its cache; rows listed
    in a shuffled order, plus two padding tokens."""
    rng = np.random.default_rng(seed)
    row, kv_len = [], []
    for i, n in enumerate(lens):
        end = int(rng.integers(n, c + 1))
        row += [i] * n
        kv_len += list(range(end - n + 1, end + 1))
    row += [-1, -1]
    kv_len += [3, 0]
    perm = rng.permutation(len(row))
    t = len(row)
    q = jnp.asarray(rng.normal(size=(t, nh, hd)), dtype)
    kc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), dtype)
    vc = jnp.asarray(rng.normal(size=(r, c, nkv, hd)), dtype)
    return q, kc, vc, np.asarray(row, np.int32)[perm], np.asarray(kv_len, np.int32)[perm]


@pytest.mark.parametrize("target,dtype,layout", [
    ("tpu-interpret", jnp.float32, "random"),
    ("tpu-interpret", jnp.bfloat16, "verify"),
    ("gpu-interpret", jnp.float32, "random"),
    pytest.param("gpu-interpret", jnp.bfloat16, "verify", marks=pytest.mark.slow),
])
def test_pallas_matches_reference(target, dtype, layout):
    if layout == "random":
        # windows, padding tokens, empty ranges, a partial last key tile (C=13, tk=4), rows split over items
        q, kc, vc, row, kv_len, kv_start = _case(4, 11, 3, 13, 4, 2, 8, dtype, window=True)
        kv_start = np.minimum(kv_start, 5)
    else:
        # one KV head (g=3), an empty cache row (row 2), rows of 1..5 tokens, 3 tokens per item
        q, kc, vc, row, kv_len = _verify_layout(5, [5, 1, 0, 3], 4, 10, 3, 1, 8, dtype)
        kv_start = None
    ks = None if kv_start is None else jnp.asarray(kv_start)
    ref = ragged_attention_reference(q, kc, vc, jnp.asarray(row), jnp.asarray(kv_len), 0.4, kv_start=ks)
    ks0 = jnp.zeros(len(row), jnp.int32) if ks is None else ks
    out = jax.jit(lambda q, k, v: ragged_attention_pallas(q, k, v, jnp.asarray(row), ks0, jnp.asarray(kv_len), 0.4,
                                                          target=target, block_t=3 if layout == "verify" else 2,
                                                          block_k=4))(q, kc, vc)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[np.asarray(row) < 0], 0.0)


def test_pallas_dispatch_grad_and_all_padding(monkeypatch):
    monkeypatch.delenv("DSPARK_KERNEL_IMPL", raising=False)
    q, kc, vc, row, kv_len, _ = _case(6, 5, 2, 6, 2, 1, 4)
    args = (jnp.asarray(row), jnp.asarray(kv_len), 0.7)
    f = lambda impl: (lambda q, k, v: jnp.sum(jnp.cos(kernels.ragged_attention(q, k, v, *args, impl=impl))))
    g_ref = jax.jit(jax.grad(f("xla"), (0, 1, 2)))(q, kc, vc)
    g_pal = jax.jit(jax.grad(f("pallas"), (0, 1, 2)))(q, kc, vc)
    for a, b in zip(g_pal, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
    pad = kernels.ragged_attention(q, kc, vc, jnp.full(5, -1, jnp.int32), jnp.asarray(kv_len), 1.0, impl="pallas")
    np.testing.assert_array_equal(np.asarray(pad), 0.0)
