"""Row partitioning of the fused vocab loss's Pallas launches (``custom_partitioning``).

A ``pallas_call`` is a custom call the SPMD partitioner cannot split: under a sharded jit it would gather every
operand and compute all rows on every device. Each launch is therefore wrapped (:func:`_row_sharded`) so that it
runs on the local shard of the rows. The weights are gathered for the call (every row needs the whole vocabulary)
and the weight gradients, which sum over rows, are psum-ed over the row shards inside the partitioned computation.
"""

from __future__ import annotations

import math

from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_PARTITION = True   # False: launch on the whole (gathered) rows; read per call, so tests can patch it


def _row_sharded(fn, args, row_args, outs):
    """``fn(*args) -> tuple`` on local shards. ``row_args[i]``: dim 0 of ``args[i]`` is the row axis (all other
    dims, and all of a non-row argument, are replicated for the call); ``outs``: per result ``(kind, ndim)``,
    kind ``"row"`` (dim 0 = rows, sharded like the inputs) or ``"sum"`` (a sum over rows: psum-ed, replicated).
    The row axis follows the first row argument whose dim 0 is sharded by mesh axes dividing it; with none, the
    call runs unsharded."""
    if not _PARTITION:
        return fn(*args)

    def row_axes(mesh, arg_shapes):
        for is_row, a in zip(row_args, arg_shapes):
            spec = tuple(getattr(a.sharding, "spec", ())) if is_row and a.sharding is not None else ()
            ax = spec[0] if spec else None
            names = () if ax is None else (tuple(ax) if isinstance(ax, (tuple, list)) else (ax,))
            if names and a.shape[0] % math.prod(mesh.shape[n] for n in names) == 0:
                return names
        return ()

    def shardings(mesh, axes, kinds):
        spec0 = (axes[0] if len(axes) == 1 else axes) if axes else None
        return tuple(NamedSharding(mesh, PartitionSpec(spec0) if k == "row" else PartitionSpec()) for k in kinds)

    in_kinds = ["row" if r else "rep" for r in row_args]
    out_kinds = [k for k, _ in outs]

    def partition(mesh, arg_shapes, result_shape):
        axes = row_axes(mesh, arg_shapes)

        def lower(*local):
            res = fn(*local)
            return tuple(lax.psum(o, axes) if k == "sum" and axes else o for o, k in zip(res, out_kinds))

        return mesh, lower, shardings(mesh, axes, out_kinds), shardings(mesh, axes, in_kinds)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, row_axes(mesh, arg_shapes), out_kinds)

    # Shardy rule: only the row factor "n" is shared; every other dim has a factor of its own, so no sharding
    # of one operand's hidden / vocab dim is propagated onto another (the partition callback replicates them)
    def dims(prefix, ndim, row):
        return " ".join((["n"] if row else []) + [f"{prefix}d{k}" for k in range(int(row), ndim)])

    rule = (", ".join(dims(f"i{i}", a.ndim, r) for i, (a, r) in enumerate(zip(args, row_args))) + " -> "
            + ", ".join(dims(f"o{j}", nd, k == "row") for j, (k, nd) in enumerate(outs)))
    wrapped = custom_partitioning(fn)
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return tuple(wrapped(*args))
