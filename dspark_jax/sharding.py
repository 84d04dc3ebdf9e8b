"""Device meshes and logical-axis sharding rules, for every use of a mesh: loading a target onto devices
(``load_target(sharding=...)``), generation on a sharded target, and training.

Parameters carry logical axis names as nnx metadata ``logical_axes`` (``embed``, ``heads``, ``kv_heads``, ``mlp``,
``vocab``, ``experts``, ``norm``; see ``nn/linear.py``, ``nn/moe.py``, ``nn/norm.py``). :class:`LogicalRules` maps
them to the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``, and :func:`sharding_fn` turns one parameter's
``(path, shape, logical_axes)`` into a :class:`~jax.sharding.NamedSharding` -- the callback
``dj.load_target(path, sharding=...)`` takes, so each tensor is placed straight onto its shards.

Example (8 devices: 2-way FSDP x 2-way tensor x 2-way expert parallelism)::

    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    target = dj.load_target("hf_dir", sharding=sharding_fn(mesh))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")
"""Mesh axis names, outermost first (``data`` spans hosts/slices best; ``tensor`` wants the fastest links)."""


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over the axes ``("data", "fsdp", "tensor", "expert")``.

    Args:
      shape: axis name -> size. Axes not named are 1, except ``fsdp`` which, when not named, takes every
        device the other axes leave over. ``None`` puts all devices on ``fsdp``. The sizes must multiply to
        the number of devices.
      devices: the devices to lay out (default ``jax.devices()``: every device of every process, so this
        also builds multi-host meshes after ``jax.distributed.initialize()``).

    Every axis is ``AxisType.Auto``. ``jax.make_mesh`` defaults to ``Explicit`` axes in current JAX, where
    shardings become part of array types and model code must annotate them (``reshard``, ``out_sharding=`` on
    matmuls and the like). We choose ``Auto`` deliberately: parameters are placed by the logical-axis rules and
    XLA's sharding propagation (GSPMD/Shardy) carries those shardings through unannotated model code, with
    ``with_sharding_constraint`` at the few points where we want to pin activations.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    shape = dict(shape or {})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"make_mesh: unknown mesh axis name(s) {unknown}; the axes are {MESH_AXES}")
    bad = {k: v for k, v in shape.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"make_mesh: axis sizes must be positive integers, got {bad}")
    if "fsdp" not in shape:
        others = math.prod(shape.values())
        if len(devices) % others:
            raise ValueError(f"make_mesh: {len(devices)} devices cannot be split by {shape} (product {others})")
        shape["fsdp"] = len(devices) // others
    sizes = tuple(shape.get(name, 1) for name in MESH_AXES)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but there are {len(devices)}")
    # Auto on every axis -- see the docstring for why (jax.make_mesh's default would be Explicit).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Logical axis name -> mesh axis (a name, a tuple of names to shard over several, or None = replicated).

    Within one parameter a mesh axis is used at most once: when two of its logical axes map to the same mesh
    axis, the first dimension (in the parameter's axis order) that can be sharded gets it and the later one is
    replicated instead. A dimension the mesh axis size does not divide is replicated as well (and then leaves
    the mesh axis free for a later dimension). Mesh axes of size 1 are fine: sharding over them is a no-op.
    A logical name with no rule is an error; a dimension whose logical name is None is replicated.
    """

    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    def __post_init__(self):
        names = [name for name, _ in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"LogicalRules: logical axis name(s) {dupes} have more than one rule")
        for name, axes in self.rules:
            if len(set(_as_tuple(axes))) != len(_as_tuple(axes)):
                raise ValueError(f"LogicalRules: rule {name!r} -> {axes!r} repeats a mesh axis")

    def mesh_axes(self, logical_name: str | None) -> tuple[str, ...]:
        """The mesh axes a logical axis maps to (empty: replicated)."""
        if logical_name is None:
            return ()
        table = dict(self.rules)
        if logical_name not in table:
            raise KeyError(f"no sharding rule for logical axis {logical_name!r} (rules: {sorted(table)})")
        return _as_tuple(table[logical_name])

    def spec(self, mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None] | None,
             where: str = "parameter") -> PartitionSpec:
        """The PartitionSpec of one array: ``logical_axes[i]`` names dimension ``i`` of ``shape``."""
        if logical_axes is None:
            return PartitionSpec()
        if len(logical_axes) != len(shape):
            raise ValueError(f"{where}: {len(logical_axes)} logical axes {tuple(logical_axes)} for a "
                             f"{len(shape)}-d shape {tuple(shape)}")
        used: set[str] = set()
        out = []
        for dim, name in zip(shape, logical_axes):
            try:
                axes = self.mesh_axes(name)
            except KeyError as e:
                raise ValueError(f"{where}: {e.args[0]}") from None
            size = math.prod(mesh.shape[a] for a in axes)
            if not axes or used.intersection(axes) or dim % size:
                out.append(None)
                continue
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def sharding_fn(mesh: Mesh, rules: LogicalRules = LogicalRules()) -> Callable[[str, tuple, tuple], NamedSharding]:
    """``(nnx_path, shape, logical_axes) -> NamedSharding`` on ``mesh`` by ``rules``, for ``load_target``."""
    for _, axes in rules.rules:
        missing = [a for a in _as_tuple(axes) if a not in mesh.shape]
        if missing:
            raise ValueError(f"sharding_fn: rules map to mesh axes {missing} that the mesh (axes "
                             f"{tuple(mesh.axis_names)}) does not have")

    def fn(path: str, shape: tuple, logical_axes: tuple | None) -> NamedSharding:
        return NamedSharding(mesh, rules.spec(mesh, shape, logical_axes, where=path))

    return fn


__all__ = ["MESH_AXES", "DEFAULT_RULES", "LogicalRules", "make_mesh", "sharding_fn"]
