"""Pallas flash attention for the DSpark training block mask (spec §1.5), forward and backward.

Layout (built by plain jnp around the kernels, differentiated by autodiff):

* queries ``[B, nkv, Qp*g, hd]``: the g query heads of one KV head are interleaved with the query positions
  (row = query * g + head), so one KV tile serves all of them and repeated KV heads are never materialised;
* keys/values ``[B, nkv, Sp + Np, hd]``: the context padded to a multiple of the key tile, then the block keys;
* per query row ``info [B, Qp*g, 4]`` int32: (ctx limit = anchor or 0, own-block start, own-block end, ctx start)
  on the padded key axis; a dropped block or a padding query has the first three 0 and sees nothing. ctx start is
  0 except in packed rows (the anchor's segment start): masked only, its tiles are still visited.

Tile skipping: for every query tile the wrapper lists the key tiles it can see (context tiles up to the largest
anchor in the tile, then the few tiles holding its own blocks); for every key tile, the query tiles that see it.
Only those (query tile, key tile) pairs are computed, so the cost follows the visible keys, not ``S * N * Bs``.

Two drivers share the same tile math:

* TPU (Mosaic): grid ``(B, nkv, tiles, steps)`` with the tile lists in SMEM (scalar prefetch); a skipped step
  re-uses the previous block index, so it costs neither a DMA nor a matmul.
* GPU (Triton): grid ``(B, nkv, tiles)``, each program loops over its visible tiles with dynamic slices.

On CPU both run in Pallas interpret mode (``target="tpu-interpret"|"gpu-interpret"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import NamedSharding, PartitionSpec

NEG = -1e30  # finite "minus infinity": keeps fully-masked rows NaN-free


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Cfg:
    target: str
    scale: float
    g: int            # query heads per kv head
    tq: int           # queries per query tile (rows = tq * g)
    tk: int           # keys per key tile
    nqt: int          # query tiles
    nkt: int          # key tiles (context + block)
    ns: int           # max key tiles per query tile
    nsq: int          # max query tiles per key tile

    @property
    def rows(self) -> int:
        return self.tq * self.g

    @property
    def interpret(self) -> bool:
        return self.target.endswith("interpret")

    @property
    def tpu(self) -> bool:
        return self.target.startswith("tpu")


# ---------------------------------------------------------------------------------------------------------
# Tile math shared by both drivers (pure functions of loaded tiles).
# ---------------------------------------------------------------------------------------------------------
def _cols(info_ref, *idx):
    """(ctx limit, block start, block end, ctx start) columns ``[rows, 1]`` of an info ref (sliced in the ref:
    Triton cannot slice values)."""
    return tuple(info_ref[(*idx, pl.ds(j, 1))] for j in range(4))


def _mask(info, k_start, rows, tk):
    kv = k_start + jax.lax.broadcasted_iota(jnp.int32, (rows, tk), 1)
    lim, bst, bend, lo = info
    return ((kv < lim) & (kv >= lo)) | ((kv >= bst) & (kv < bend))


def _fwd_step(q, k, v, mask, scale, m, l, acc):
    s = pl.dot(q, k, trans_b=True) * scale
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + pl.dot(p.astype(v.dtype), v)
    return m_new, l, acc


def _finalize(m, l, acc):
    ok = l > 0.0
    out = jnp.where(ok, acc / jnp.where(ok, l, 1.0), 0.0)
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)
    return out, lse


def _probs(q, k, mask, lse, scale):
    s = pl.dot(q, k, trans_b=True) * scale
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


def _dq_step(q, k, v, do, lse, delta, mask, scale, dq):
    p = _probs(q, k, mask, lse, scale)
    dp = pl.dot(do, v, trans_b=True)
    ds = p * (dp - delta)
    return dq + pl.dot(ds.astype(k.dtype), k) * scale


def _dkv_step(q, k, v, do, lse, delta, mask, scale, dk, dv):
    p = _probs(q, k, mask, lse, scale)
    dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
    dp = pl.dot(do, v, trans_b=True)
    ds = p * (dp - delta)
    dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True) * scale
    return dk, dv


# ---------------------------------------------------------------------------------------------------------
# TPU (Mosaic) driver: grid over (B, nkv, tile, step); tile lists are scalar-prefetched into SMEM.
# ---------------------------------------------------------------------------------------------------------
def _tpu_fwd_kernel(tiles, counts, q_ref, k_ref, v_ref, info_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, c):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * c.nqt + i

    @pl.when(s == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(s < counts[row])
    def _():
        mask = _mask(_cols(info_ref, slice(None)), tiles[row * c.ns + s] * c.tk, c.rows, c.tk)
        m, l, acc = _fwd_step(q_ref[...], k_ref[...], v_ref[...], mask, c.scale, m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(s == c.ns - 1)
    def _():
        out, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_dq_kernel(tiles, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, info_ref, dq_ref, dq_sc, *, c):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * c.nqt + i

    @pl.when(s == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(s < counts[row])
    def _():
        mask = _mask(_cols(info_ref, slice(None)), tiles[row * c.ns + s] * c.tk, c.rows, c.tk)
        dq_sc[...] = _dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask,
                              c.scale, dq_sc[...])

    @pl.when(s == c.ns - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(qtiles, qcounts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, info_ref, dk_ref, dv_ref,
                    dk_sc, dv_sc, *, c):
    b, j, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * c.nkt + j

    @pl.when(s == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(s < qcounts[row])
    def _():
        mask = _mask(_cols(info_ref, slice(None)), j * c.tk, c.rows, c.tk)
        dk, dv = _dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask,
                           c.scale, dk_sc[...], dv_sc[...])
        dk_sc[...], dv_sc[...] = dk, dv

    @pl.when(s == c.nsq - 1)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_call(kernel, c, grid, in_specs, out_specs, out_shape, scratch, tables, args):
    return pl.pallas_call(
        functools.partial(kernel, c=c),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=c.interpret,
        name="dspark_block_attention",
    )(*tables, *args)


def _tpu_specs(c, hd):
    """BlockSpecs for (per-query-tile q-like, per-key-tile kv-like, per-query-tile info) for fwd/dq grids."""
    qspec = pl.BlockSpec((pl.squeezed, pl.squeezed, c.rows, hd), lambda b, h, i, s, t, n: (b, h, i, 0))
    vecspec = pl.BlockSpec((pl.squeezed, pl.squeezed, c.rows, 1), lambda b, h, i, s, t, n: (b, h, i, 0))
    kspec = pl.BlockSpec((pl.squeezed, pl.squeezed, c.tk, hd),
                         lambda b, h, i, s, t, n: (b, h, t[(b * c.nqt + i) * c.ns + s], 0))
    ispec = pl.BlockSpec((pl.squeezed, c.rows, 4), lambda b, h, i, s, t, n: (b, i, 0))
    return qspec, vecspec, kspec, ispec


def _tpu_fwd(c, qp, kp, vp, info, tabs):
    tabs = {name: x.reshape(-1) for name, x in tabs.items()}
    b, nkv, nrows, hd = qp.shape
    qspec, vecspec, kspec, ispec = _tpu_specs(c, hd)
    return _tpu_call(
        _tpu_fwd_kernel, c, (b, nkv, c.nqt, c.ns), [qspec, kspec, kspec, ispec], [qspec, vecspec],
        [jax.ShapeDtypeStruct(qp.shape, qp.dtype), jax.ShapeDtypeStruct((b, nkv, nrows, 1), jnp.float32)],
        [pltpu.VMEM((c.rows, 1), jnp.float32), pltpu.VMEM((c.rows, 1), jnp.float32),
         pltpu.VMEM((c.rows, hd), jnp.float32)],
        (tabs["kv_tiles"], tabs["kv_counts"]), (qp, kp, vp, info))


def _tpu_bwd(c, qp, kp, vp, do, lse, delta, info, tabs):
    tabs = {name: x.reshape(-1) for name, x in tabs.items()}
    b, nkv, nrows, hd = qp.shape
    qspec, vecspec, kspec, ispec = _tpu_specs(c, hd)
    dq = _tpu_call(
        _tpu_dq_kernel, c, (b, nkv, c.nqt, c.ns), [qspec, kspec, kspec, qspec, vecspec, vecspec, ispec], qspec,
        jax.ShapeDtypeStruct(qp.shape, qp.dtype), [pltpu.VMEM((c.rows, hd), jnp.float32)],
        (tabs["kv_tiles"], tabs["kv_counts"]), (qp, kp, vp, do, lse, delta, info))

    qt = lambda b, j, s, t: t[(b * c.nkt + j) * c.nsq + s]
    qspec2 = pl.BlockSpec((pl.squeezed, pl.squeezed, c.rows, hd), lambda b, h, j, s, t, n: (b, h, qt(b, j, s, t), 0))
    vecspec2 = pl.BlockSpec((pl.squeezed, pl.squeezed, c.rows, 1), lambda b, h, j, s, t, n: (b, h, qt(b, j, s, t), 0))
    ispec2 = pl.BlockSpec((pl.squeezed, c.rows, 4), lambda b, h, j, s, t, n: (b, qt(b, j, s, t), 0))
    kspec2 = pl.BlockSpec((pl.squeezed, pl.squeezed, c.tk, hd), lambda b, h, j, s, t, n: (b, h, j, 0))
    dk, dv = _tpu_call(
        _tpu_dkv_kernel, c, (b, nkv, c.nkt, c.nsq),
        [qspec2, kspec2, kspec2, qspec2, vecspec2, vecspec2, ispec2], [kspec2, kspec2],
        [jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        [pltpu.VMEM((c.tk, hd), jnp.float32), pltpu.VMEM((c.tk, hd), jnp.float32)],
        (tabs["q_tiles"], tabs["q_counts"]), (qp, kp, vp, do, lse, delta, info))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# GPU (Triton) driver: one program per (B, nkv, tile), looping over the tile's visible partners.
# Whole-array refs, indexed by program id and dynamic slices (all arrays are padded to whole tiles).
# ---------------------------------------------------------------------------------------------------------
def _gpu_fwd_kernel(tiles, counts, q_ref, k_ref, v_ref, info_ref, o_ref, lse_ref, *, c):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * c.nqt + i
    rs = pl.ds(pl.multiple_of(i * c.rows, c.rows), c.rows)
    hd = q_ref.shape[-1]
    q = q_ref[b, h, rs, :]
    info = _cols(info_ref, b, rs)

    def body(s, carry):
        start = pl.multiple_of(tiles[row * c.ns + s] * c.tk, c.tk)
        ks = pl.ds(start, c.tk)
        return _fwd_step(q, k_ref[b, h, ks, :], v_ref[b, h, ks, :], _mask(info, start, c.rows, c.tk), c.scale,
                         *carry)

    init = (jnp.full((c.rows, 1), NEG, jnp.float32), jnp.zeros((c.rows, 1), jnp.float32),
            jnp.zeros((c.rows, hd), jnp.float32))
    out, lse = _finalize(*jax.lax.fori_loop(0, counts[row], body, init))
    o_ref[b, h, rs, :] = out.astype(o_ref.dtype)
    lse_ref[b, h, rs, :] = lse


def _gpu_dq_kernel(tiles, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, info_ref, dq_ref, *, c):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * c.nqt + i
    rs = pl.ds(pl.multiple_of(i * c.rows, c.rows), c.rows)
    q, do, lse, delta = q_ref[b, h, rs, :], do_ref[b, h, rs, :], lse_ref[b, h, rs, :], delta_ref[b, h, rs, :]
    info = _cols(info_ref, b, rs)

    def body(s, dq):
        start = pl.multiple_of(tiles[row * c.ns + s] * c.tk, c.tk)
        ks = pl.ds(start, c.tk)
        return _dq_step(q, k_ref[b, h, ks, :], v_ref[b, h, ks, :], do, lse, delta, _mask(info, start, c.rows, c.tk),
                        c.scale, dq)

    dq = jax.lax.fori_loop(0, counts[row], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[b, h, rs, :] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(qtiles, qcounts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, info_ref, dk_ref, dv_ref, *, c):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * c.nkt + j
    ks = pl.ds(pl.multiple_of(j * c.tk, c.tk), c.tk)
    k, v = k_ref[b, h, ks, :], v_ref[b, h, ks, :]

    def body(s, carry):
        rs = pl.ds(pl.multiple_of(qtiles[row * c.nsq + s] * c.rows, c.rows), c.rows)
        mask = _mask(_cols(info_ref, b, rs), j * c.tk, c.rows, c.tk)
        return _dkv_step(q_ref[b, h, rs, :], k, v, do_ref[b, h, rs, :], lse_ref[b, h, rs, :], delta_ref[b, h, rs, :],
                         mask, c.scale, *carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, qcounts[row], body, (zeros, zeros))
    dk_ref[b, h, ks, :] = dk.astype(dk_ref.dtype)
    dv_ref[b, h, ks, :] = dv.astype(dv_ref.dtype)


def _gpu_call(kernel, c, grid, out_shape, args):
    return pl.pallas_call(
        functools.partial(kernel, c=c), grid=grid, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=8 if c.rows * c.tk >= 128 * 64 else 4, num_stages=2),
        interpret=c.interpret, name="dspark_block_attention",
    )(*args)


def _gpu_fwd(c, qp, kp, vp, info, tabs):
    tabs = {name: x.reshape(-1) for name, x in tabs.items()}
    b, nkv, nrows, _ = qp.shape
    return _gpu_call(_gpu_fwd_kernel, c, (b, nkv, c.nqt),
                     [jax.ShapeDtypeStruct(qp.shape, qp.dtype), jax.ShapeDtypeStruct((b, nkv, nrows, 1), jnp.float32)],
                     (tabs["kv_tiles"], tabs["kv_counts"], qp, kp, vp, info))


def _gpu_bwd(c, qp, kp, vp, do, lse, delta, info, tabs):
    tabs = {name: x.reshape(-1) for name, x in tabs.items()}
    b, nkv, _, _ = qp.shape
    dq = _gpu_call(_gpu_dq_kernel, c, (b, nkv, c.nqt), jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                   (tabs["kv_tiles"], tabs["kv_counts"], qp, kp, vp, do, lse, delta, info))
    dk, dv = _gpu_call(_gpu_dkv_kernel, c, (b, nkv, c.nkt),
                       [jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
                       (tabs["q_tiles"], tabs["q_counts"], qp, kp, vp, do, lse, delta, info))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# custom_vjp over the padded layout.
# ---------------------------------------------------------------------------------------------------------
# Wrap each kernel launch in custom_partitioning so that a jit whose inputs are sharded over the batch (and the
# kv heads) runs it per shard instead of gathering its operands (a custom call is opaque to the partitioner).
_PARTITION = True


def _sharded(fn, rule: str):
    """``fn(*arrays) -> tuple``; ``rule`` names each operand's/result's dims (Shardy einsum-like rule). Dims ``b``
    (batch) and ``h`` (kv heads) follow the first operand's sharding where it divides them; all else replicated."""
    if not _PARTITION:
        return fn

    ins, outs = ([f.split() for f in side.split(",")] for side in rule.split("->"))

    def axes(mesh, arg_shapes):
        spec, shape = tuple(arg_shapes[0].sharding.spec), arg_shapes[0].shape
        picked = []
        for dim in (0, 1):
            ax = spec[dim] if dim < len(spec) else None
            names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            picked.append(ax if names and shape[dim] % math.prod(mesh.shape[a] for a in names) == 0 else None)
        return picked

    def shardings(mesh, factor_lists, bax, hax):
        return tuple(NamedSharding(mesh, PartitionSpec(*[bax if f == "b" else hax if f == "h" else None
                                                          for f in fl])) for fl in factor_lists)

    def partition(mesh, arg_shapes, result_shape):
        bax, hax = axes(mesh, arg_shapes)
        return mesh, fn, shardings(mesh, outs, bax, hax), shardings(mesh, ins, bax, hax)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, outs, *axes(mesh, arg_shapes))

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return wrapped


_FWD_RULE = "b h r d, b h l d, b h l d, b r c, b x, b y -> b h r d, b h r o"
_BWD_RULE = ("b h r d, b h l d, b h l d, b h r d, b h r o, b h r o, b r c, b x, b y, b z, b w "
             "-> b h r d, b h l d, b h l d")


def _fwd_impl(c, qp, kp, vp, info, tabs):
    def fn(qp, kp, vp, info, kv_tiles, kv_counts):
        tabs = dict(kv_tiles=kv_tiles, kv_counts=kv_counts)
        return tuple((_tpu_fwd if c.tpu else _gpu_fwd)(c, qp, kp, vp, info, tabs))

    return _sharded(fn, _FWD_RULE)(qp, kp, vp, info, tabs["kv_tiles"], tabs["kv_counts"])


def _bwd_impl(c, qp, kp, vp, do, lse, delta, info, tabs):
    def fn(qp, kp, vp, do, lse, delta, info, kv_tiles, kv_counts, q_tiles, q_counts):
        tabs = dict(kv_tiles=kv_tiles, kv_counts=kv_counts, q_tiles=q_tiles, q_counts=q_counts)
        return tuple((_tpu_bwd if c.tpu else _gpu_bwd)(c, qp, kp, vp, do, lse, delta, info, tabs))

    return _sharded(fn, _BWD_RULE)(qp, kp, vp, do, lse, delta, info, tabs["kv_tiles"], tabs["kv_counts"],
                                   tabs["q_tiles"], tabs["q_counts"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c, qp, kp, vp, info, tabs):
    return _fwd_impl(c, qp, kp, vp, info, tabs)[0]


def _flash_fwd(c, qp, kp, vp, info, tabs):
    out, lse = _fwd_impl(c, qp, kp, vp, info, tabs)
    return out, (qp, kp, vp, info, tabs, out, lse)


def _flash_bwd(c, res, do):
    qp, kp, vp, info, tabs, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = _bwd_impl(c, qp, kp, vp, do.astype(qp.dtype), lse, delta, info, tabs)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------------------
# Wrapper: layout, per-row info and tile tables.
# ---------------------------------------------------------------------------------------------------------
def _pad_axis(x, axis, size):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _first_valid_fill(ids, counts):
    """``ids [..., n]`` lists with ``counts [...]`` valid entries: entries past the count repeat the last valid
    one (0 when none), so a skipped grid step keeps the previous block index (no new DMA on TPU)."""
    n = ids.shape[-1]
    step = jnp.arange(n, dtype=jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    return jnp.where(step < counts[..., None], ids, jnp.where(counts[..., None] > 0, last, 0)).astype(jnp.int32)


def tables(lim, bst, bend, c: _Cfg):
    """Per query tile, the visible key tiles; per key tile, the query tiles that see it (``[B, ...]`` each; the
    kernels index them flattened)."""
    b = lim.shape[0]
    lim_t, bst_t, bend_t = (x.reshape(b, c.nqt, c.tq) for x in (lim, bst, bend))
    n_ctx = -(-jnp.max(lim_t, axis=-1) // c.tk)                                        # [B, nqt]
    kept = bend_t > bst_t
    big = jnp.iinfo(jnp.int32).max
    blo = jnp.min(jnp.where(kept, bst_t, big), axis=-1) // c.tk
    bhi = -(-jnp.max(jnp.where(kept, bend_t, 0), axis=-1) // c.tk)
    n_blk = jnp.where(jnp.any(kept, axis=-1), bhi - blo, 0)
    blo = jnp.where(n_blk > 0, blo, 0)
    counts = (n_ctx + n_blk).astype(jnp.int32)
    step = jnp.arange(c.ns, dtype=jnp.int32)
    ids = jnp.where(step < n_ctx[..., None], step, blo[..., None] + step - n_ctx[..., None])
    kv_tiles = _first_valid_fill(ids, counts)
    # Inverse: which query tiles see key tile j.
    j = jnp.arange(c.nkt, dtype=jnp.int32)
    vis = (j[None, None, :] < n_ctx[..., None]) | ((j >= blo[..., None]) & (j < (blo + n_blk)[..., None]))
    vis = jnp.swapaxes(vis, 1, 2)                                                      # [B, nkt, nqt]
    order = jnp.argsort(~vis, axis=-1, stable=True).astype(jnp.int32)[..., :c.nsq]
    q_counts = jnp.minimum(jnp.sum(vis, axis=-1), c.nsq).astype(jnp.int32)
    q_tiles = _first_valid_fill(order, q_counts)
    return dict(kv_tiles=kv_tiles.reshape(b, -1), kv_counts=counts, q_tiles=q_tiles.reshape(b, -1),
                q_counts=q_counts)


def plan(q_shape, k_shape, block_size: int, target: str, scale: float = 1.0, block_q: int | None = None,
         block_k: int | None = None) -> _Cfg:
    """Static tiling for queries ``q_shape = [B, N*Bs, nh, hd]`` and keys ``k_shape = [B, S + N*Bs, nkv, hd]``."""
    nq, nh = q_shape[1], q_shape[2]
    g = nh // k_shape[2]
    s = k_shape[1] - nq
    gpu = target.startswith("gpu")
    # GPU: ~128 query rows (tq * g) per program, 64 keys per loop step. TPU: 128 queries (128 * g rows) x 512
    # keys per grid step, large enough that the ~0.35 us per-step overhead does not dominate the matmuls.
    tq = block_q or (max(16, 128 // g) if gpu else 128)
    tk = block_k or (64 if gpu else 512)
    # Small problems get smaller tiles (Triton wants powers of two, Mosaic multiples of 8).
    fit = pl.next_power_of_2 if gpu else (lambda x: _round_up(x, 8))
    tq = min(tq, fit(nq))
    tk = min(tk, fit(max(s, nq, 1)))
    nq_p, s_p, nb_p = _round_up(nq, tq), _round_up(max(s, 1), tk), _round_up(nq, tk)
    # Key tiles one query tile's own blocks can span (at most), bounded by the block-key tiles.
    blk_tiles = min(nb_p // tk, -(-(tq + 2 * (block_size - 1)) // tk) + 1)
    return _Cfg(target=target, scale=float(scale), g=g, tq=tq, tk=tk, nqt=nq_p // tq, nkt=(s_p + nb_p) // tk,
                ns=s_p // tk + blk_tiles, nsq=nq_p // tq)


def query_info(anchors, block_keep, c: _Cfg, ctx_len: int, block_size: int):
    """Per padded query: (ctx limit, own-block start, own-block end) ``[B, Qp]`` each, on the padded key axis
    (context padded to a whole number of key tiles, then the block keys); all 0 for dropped/padding queries."""
    n = anchors.shape[1]
    nq = n * block_size
    s_p = _round_up(max(ctx_len, 1), c.tk)
    qi = jnp.arange(c.nqt * c.tq, dtype=jnp.int32)
    blk = jnp.minimum(qi // block_size, n - 1)
    keepq = jnp.take(block_keep, blk, axis=1) & (qi < nq)[None]
    lim = jnp.where(keepq, jnp.clip(jnp.take(anchors, blk, axis=1), 0, ctx_len), 0)
    bst = jnp.where(keepq, s_p + blk * block_size, 0)
    bend = jnp.where(keepq, s_p + jnp.minimum(blk * block_size + block_size, nq), 0)
    return lim, bst, bend


def query_ctx_start(ctx_start, c: _Cfg, block_size: int):
    """Per padded query: the first context key it sees ``[B, Qp]`` (packed rows; 0 for padding queries)."""
    n = ctx_start.shape[1]
    qi = jnp.arange(c.nqt * c.tq, dtype=jnp.int32)
    lo = jnp.take(ctx_start.astype(jnp.int32), jnp.minimum(qi // block_size, n - 1), axis=1)
    return jnp.where((qi < n * block_size)[None], lo, 0)


def block_attention_pallas(q, k, v, anchors, block_keep, scale, *, block_size: int, target: str,
                           block_q: int | None = None, block_k: int | None = None, ctx_start=None):
    """Pallas DSpark block attention; see :func:`dspark_jax.kernels.block_attention.dspark_block_attention`."""
    b, nq, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    s = k.shape[1] - nq
    c = plan(q.shape, k.shape, block_size, target, scale, block_q, block_k)
    nq_p, s_p = c.nqt * c.tq, _round_up(max(s, 1), c.tk)
    nb_p = c.nkt * c.tk - s_p

    lim, bst, bend = query_info(anchors, block_keep, c, s, block_size)
    lo = jnp.zeros_like(lim) if ctx_start is None else query_ctx_start(ctx_start, c, block_size)
    tabs = tables(lim, bst, bend, c)
    info = jnp.repeat(jnp.stack([lim, bst, bend, lo], axis=-1).astype(jnp.int32), g, axis=1)  # [B, nq_p*g, 4]

    dt = jnp.promote_types(q.dtype, k.dtype)
    qp = _pad_axis(q.astype(dt), 1, nq_p).reshape(b, nq_p, nkv, g, hd).transpose(0, 2, 1, 3, 4)
    qp = qp.reshape(b, nkv, nq_p * g, hd)

    def kv_layout(x):
        x = jnp.concatenate([_pad_axis(x[:, :s], 1, s_p), _pad_axis(x[:, s:], 1, nb_p)], axis=1).astype(dt)
        return x.transpose(0, 2, 1, 3)

    out = _flash(c, qp, kv_layout(k), kv_layout(v), info, tabs)                       # [B, nkv, nq_p*g, hd]
    out = out.reshape(b, nkv, nq_p, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, nq_p, nh, hd)
    return out[:, :nq].astype(q.dtype)
