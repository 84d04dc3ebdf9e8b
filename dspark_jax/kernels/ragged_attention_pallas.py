"""Pallas ragged verify / decode attention over per-row KV caches (forward; the backward re-uses the reference).

The flattened query tokens are grouped by cache row into *work items* of up to ``tt`` tokens of one row (a row
with more tokens spans several items; padding tokens and tokens with an empty slot range join none and get
exactly 0). Each item reads only the key tiles covering ``[min kv_start, max kv_len)`` of its tokens, so the
cost follows the visible cache, and each KV tile is loaded once for all ``tt`` tokens and all query heads of
the row (GQA rows are ``token * g + head``; the cache is never repeated or transposed).

* TPU (Mosaic): grid ``(items, key tiles)``; item rows and tile ranges are scalar-prefetched; a key tile is a
  ``[tk, nkv * hd]`` block of the cache seen as ``[R, C, nkv * hd]`` (a free reshape), heads are lane slices.
  Steps past an item's range keep the previous block index, so they cost no DMA and no matmul.
* GPU (Triton): grid ``(items, nkv)``; each program loops over its key tiles with masked loads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from dspark_jax.kernels.block_attention_pallas import NEG, _finalize, _fwd_step
from dspark_jax.kernels.ragged_attention_xla import ragged_attention_reference


@dataclasses.dataclass(frozen=True)
class _Cfg:
    target: str
    scale: float
    g: int
    nkv: int
    hd: int
    tt: int      # tokens per item (rows = tt * g)
    tk: int      # cache slots per key tile
    nkt: int     # key tiles in a row's cache
    cap: int     # cache capacity C

    @property
    def rows(self) -> int:
        return self.tt * self.g

    @property
    def interpret(self) -> bool:
        return self.target.endswith("interpret")


def _mask(ks, kl, start, rows, tk):
    kv = start + jax.lax.broadcasted_iota(jnp.int32, (rows, tk), 1)
    return (kv >= ks) & (kv < kl)


# ---------------------------------------------------------------------------------------------------------
# TPU driver.
# ---------------------------------------------------------------------------------------------------------
def _tpu_kernel(item_row, item_lo, item_n, q_ref, k_ref, v_ref, info_ref, o_ref, m_sc, l_sc, acc_sc, *, c):
    i, s = pl.program_id(0), pl.program_id(1)

    @pl.when(s == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(s < item_n[i])
    def _():
        start = (item_lo[i] + s) * c.tk
        mask = _mask(info_ref[:, pl.ds(0, 1)], info_ref[:, pl.ds(1, 1)], start, c.rows, c.tk)
        # Slots past the capacity (a partial last tile) hold garbage: zero them so 0 * garbage stays 0.
        in_cache = (start + jax.lax.broadcasted_iota(jnp.int32, (c.tk, 1), 0)) < c.cap
        for h in range(c.nkv):
            hs = pl.ds(h * c.hd, c.hd)
            k = jnp.where(in_cache, k_ref[:, hs], 0).astype(q_ref.dtype)
            v = jnp.where(in_cache, v_ref[:, hs], 0).astype(q_ref.dtype)
            m, l, acc = _fwd_step(q_ref[h], k, v, mask, c.scale, m_sc[h], l_sc[h], acc_sc[h])
            m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

    @pl.when(s == c.nkt - 1)
    def _():
        for h in range(c.nkv):
            out, _ = _finalize(m_sc[h], l_sc[h], acc_sc[h])
            o_ref[h] = out.astype(o_ref.dtype)


def _tpu_call(c, qi, kc, vc, info, item_row, item_lo, item_n):
    ni = qi.shape[0]

    def kv_map(i, s, row, lo, n):
        return row[i], lo[i] + jnp.minimum(s, jnp.maximum(n[i] - 1, 0)), 0

    qspec = pl.BlockSpec((pl.squeezed, c.nkv, c.rows, c.hd), lambda i, s, row, lo, n: (i, 0, 0, 0))
    kspec = pl.BlockSpec((pl.squeezed, c.tk, c.nkv * c.hd), kv_map)
    ispec = pl.BlockSpec((pl.squeezed, c.rows, 4), lambda i, s, row, lo, n: (i, 0, 0))
    return pl.pallas_call(
        functools.partial(_tpu_kernel, c=c),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(ni, c.nkt), in_specs=[qspec, kspec, kspec, ispec], out_specs=qspec,
            scratch_shapes=[pltpu.VMEM((c.nkv, c.rows, 1), jnp.float32), pltpu.VMEM((c.nkv, c.rows, 1), jnp.float32),
                            pltpu.VMEM((c.nkv, c.rows, c.hd), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qi.shape, qi.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=c.interpret, name="ragged_attention",
    )(item_row, item_lo, item_n, qi, kc, vc, info)


# ---------------------------------------------------------------------------------------------------------
# GPU driver.
# ---------------------------------------------------------------------------------------------------------
def _gpu_kernel(item_row, item_lo, item_n, q_ref, k_ref, v_ref, info_ref, o_ref, *, c):
    i, h = pl.program_id(0), pl.program_id(1)
    q = q_ref[i, h]
    ks, kl = info_ref[i, :, pl.ds(0, 1)], info_ref[i, :, pl.ds(1, 1)]
    row, lo = item_row[i], item_lo[i]
    hs = pl.ds(pl.multiple_of(h * c.hd, c.hd), c.hd)

    def body(s, carry):
        start = (lo + s) * c.tk
        slots = pl.ds(start, c.tk)
        in_cache = (start + jax.lax.broadcasted_iota(jnp.int32, (c.tk, c.hd), 0)) < c.cap
        k = pltriton.load(k_ref.at[row, slots, hs], mask=in_cache, other=0).astype(q.dtype)
        v = pltriton.load(v_ref.at[row, slots, hs], mask=in_cache, other=0).astype(q.dtype)
        return _fwd_step(q, k, v, _mask(ks, kl, start, c.rows, c.tk), c.scale, *carry)

    init = (jnp.full((c.rows, 1), NEG, jnp.float32), jnp.zeros((c.rows, 1), jnp.float32),
            jnp.zeros((c.rows, c.hd), jnp.float32))
    out, _ = _finalize(*jax.lax.fori_loop(0, item_n[i], body, init))
    o_ref[i, h] = out.astype(o_ref.dtype)


def _gpu_call(c, qi, kc, vc, info, item_row, item_lo, item_n):
    return pl.pallas_call(
        functools.partial(_gpu_kernel, c=c), grid=(qi.shape[0], c.nkv),
        out_shape=jax.ShapeDtypeStruct(qi.shape, qi.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=c.interpret, name="ragged_attention",
    )(item_row, item_lo, item_n, qi, kc, vc, info)


# ---------------------------------------------------------------------------------------------------------
# Wrapper: work items, gathers, scatter back.
# ---------------------------------------------------------------------------------------------------------
def _forward(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k):
    t, nh, hd = q.shape
    r, cap, nkv, _ = k_cache.shape
    if t == 0 or cap == 0:
        return jnp.zeros_like(q)
    g = nh // nkv
    gpu = target.startswith("gpu")
    tt = block_t or (max(1, 64 // g) if gpu else 8)
    tk = block_k or (64 if gpu else 512)
    if cap <= tk:  # one tile covers the cache: Triton wants a power of two, Mosaic the full dim
        tk = pl.next_power_of_2(cap) if gpu else cap
    c = _Cfg(target=target, scale=float(scale), g=g, nkv=nkv, hd=hd, tt=tt, tk=tk, nkt=-(-cap // tk), cap=cap)

    kv_len = jnp.clip(kv_len, 0, cap)
    kv_start = jnp.clip(kv_start, 0, cap)
    valid = (row >= 0) & (kv_len > kv_start)
    key = jnp.where(valid, jnp.clip(row, 0, r - 1), r)                          # invalid tokens sort last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    n_r = jnp.zeros(r + 1, jnp.int32).at[key].add(1)[:r]
    tok_start = jnp.cumsum(n_r) - n_r
    items_r = -(-n_r // tt)
    items_end = jnp.cumsum(items_r)
    ni = max(1, min(t, t // tt + r))                                            # static bound on the item count
    it = jnp.arange(ni, dtype=jnp.int32)
    item_row = jnp.minimum(jnp.searchsorted(items_end, it, side="right"), r - 1).astype(jnp.int32)
    k_in_row = it - (items_end - items_r)[item_row]
    cnt = jnp.where(it < items_end[-1], jnp.clip(n_r[item_row] - k_in_row * tt, 0, tt), 0)
    slot = jnp.arange(tt, dtype=jnp.int32)
    ok = slot[None, :] < cnt[:, None]                                           # [ni, tt]
    tok = jnp.where(ok, order[jnp.clip(tok_start[item_row][:, None] + k_in_row[:, None] * tt + slot, 0, t - 1)], t)

    ks = jnp.where(ok, kv_start[jnp.minimum(tok, t - 1)], 0)
    kl = jnp.where(ok, kv_len[jnp.minimum(tok, t - 1)], 0)
    lo = jnp.min(jnp.where(ok, ks, cap), axis=1)
    hi = jnp.max(jnp.where(ok, kl, 0), axis=1)
    item_lo = jnp.where(cnt > 0, lo // tk, 0).astype(jnp.int32)
    item_n = jnp.where(cnt > 0, -(-hi // tk) - lo // tk, 0).astype(jnp.int32)
    zero = jnp.zeros_like(ks)
    info = jnp.repeat(jnp.stack([ks, kl, zero, zero], axis=-1).astype(jnp.int32), g, axis=1)   # [ni, tt*g, 4]

    dt = jnp.promote_types(q.dtype, k_cache.dtype)
    qpad = jnp.concatenate([q.astype(dt), jnp.zeros((1, nh, hd), dt)], axis=0)
    qi = qpad[tok].reshape(ni, tt, nkv, g, hd).transpose(0, 2, 1, 3, 4).reshape(ni, nkv, tt * g, hd)
    kc = k_cache.reshape(r, cap, nkv * hd)
    vc = v_cache.reshape(r, cap, nkv * hd)
    call = _gpu_call if gpu else _tpu_call
    oi = call(c, qi, kc, vc, info, item_row, item_lo, item_n)
    oi = oi.reshape(ni, nkv, tt, g, hd).transpose(0, 2, 1, 3, 4).reshape(ni * tt, nh, hd)
    out = jnp.zeros((t, nh, hd), dt).at[tok.reshape(-1)].set(oi, mode="drop")
    return out.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ragged(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k):
    return _forward(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k)


def _ragged_fwd(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k):
    out = _forward(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k)
    return out, (q, k_cache, v_cache, row, kv_start, kv_len)


def _ragged_bwd(scale, target, block_t, block_k, res, g):
    q, k_cache, v_cache, row, kv_start, kv_len = res
    _, vjp = jax.vjp(lambda q, k, v: ragged_attention_reference(q, k, v, row, kv_len, scale, kv_start=kv_start),
                     q, k_cache, v_cache)
    return (*vjp(g), None, None, None)


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def ragged_attention_pallas(q, k_cache, v_cache, row, kv_start, kv_len, scale, *, target: str,
                            block_t: int | None = None, block_k: int | None = None):
    """Pallas ragged attention (``target`` from :func:`dspark_jax.kernels._dispatch.resolve`); the contract is
    :func:`dspark_jax.kernels.ragged_attention_xla.ragged_attention_reference`. Differentiable: the backward pass is
    the reference's (verification and decoding do not train)."""
    return _ragged(q, k_cache, v_cache, row, kv_start, kv_len, scale, target, block_t, block_k)
