"""Reading and writing checkpoints through a key table (names.py): strict, tensor by tensor.

``read_state`` fills an abstract nnx state from safetensors files; ``export_tensors`` turns a state back into
checkpoint names and layouts. Both are shared by the target (hf.py) and draft (deepspec.py) converters.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.convert.names import KeyRule
from dspark_jax.convert.safetensors_io import CheckpointError, iter_tensors

ShardingFn = Callable[[str, tuple, tuple], "jax.sharding.Sharding | None"]
"""``(nnx_path, shape, logical_axes) -> sharding`` (None = default device)."""

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def dtype_name(dtype) -> str:
    return {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
            jnp.dtype(jnp.float16): "float16"}.get(jnp.dtype(dtype), "float32")


# ---- key matching -----------------------------------------------------------------------------

class _Matcher:
    def __init__(self, rules: tuple[KeyRule, ...]):
        self.rules = [(r, r.torch_regex()) for r in rules]
        self.save_rules = [(r, r.nnx_regex()) for r in rules if r.save]

    def match_torch(self, key: str):
        for rule, rx in self.rules:
            m = rx.match(key)
            if m:
                return rule, m.groupdict()
        return None, None

    def match_nnx(self, path: str):
        for rule, rx in self.save_rules:
            m = rx.match(path)
            if m:
                return rule, m.groupdict()
        return None, None


def _fill(template: str, groups: dict) -> str:
    return template.format(**groups)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _expected_torch_shape(kind: str, nnx_shape: tuple) -> tuple:
    if kind == "transpose":
        return tuple(reversed(nnx_shape))
    if kind == "expert":
        return (nnx_shape[2], nnx_shape[1])
    if kind == "fused_down":
        return (nnx_shape[0], nnx_shape[2], nnx_shape[1])
    return tuple(nnx_shape)


def _to_nnx(kind: str, arr: np.ndarray) -> np.ndarray:
    if kind == "transpose":
        return arr.T
    if kind == "expert":
        return arr.T
    if kind == "fused_down":
        return np.transpose(arr, (0, 2, 1))
    return arr


def read_state(abs_state, files, rules, ignored, dtype, sharding: ShardingFn | None, skip_keys=frozenset(),
               strip_prefix: str | None = None, tensors=None):
    """Reads every checkpoint tensor into a dict nnx_path -> jax.Array, strictly: a missing, unexpected or
    mis-shaped key is a :class:`CheckpointError` naming it (and both shapes).

    ``tensors``: optional iterable of ``(source, key, handle)`` (``handle.shape``, ``handle.read()``) used instead
    of reading ``files``, for converters that rename or reshape tensors on the way in."""
    matcher = _Matcher(rules)
    expected = {}  # nnx path -> (shape, logical_axes)
    param_dtypes = {}  # nnx path -> storage dtype: ``dtype``, except parameters a model keeps wider (fp32 routers)
    for p, var in nnx.to_flat_state(abs_state):
        value = var.get_value()
        expected[_path_str(p)] = (tuple(value.shape), var.get_metadata().get("logical_axes"))
        param_dtypes[_path_str(p)] = np.promote_types(np.dtype(dtype), value.dtype)
    np_dtype = np.dtype(dtype)

    values: dict[str, jax.Array] = {}
    expert_buffers: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}  # path -> (buffer, filled, source)
    unexpected = []

    def place(nnx_path: str, arr: np.ndarray, source: str):
        if nnx_path in values:
            raise CheckpointError(f"{source}: parameter {nnx_path} is given twice in the checkpoint")
        shape, axes = expected[nnx_path]
        arr = np.asarray(arr).astype(param_dtypes[nnx_path], copy=False)
        sh = sharding(nnx_path, shape, axes) if sharding is not None else None
        values[nnx_path] = jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr)

    for file, key, handle in (iter_tensors(files) if tensors is None else tensors):
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        if key in skip_keys or any(rx.match(key) for rx in ignored):
            continue
        rule, groups = matcher.match_torch(key)
        if rule is None:
            unexpected.append(key)
            continue
        source = f"{os.path.basename(file)}:{key}"
        if rule.kind == "fused_gate_up":
            gate_path = f"layers.{groups['layer']}.mlp.gate_proj"
            up_path = f"layers.{groups['layer']}.mlp.up_proj"
            if gate_path not in expected:
                unexpected.append(key)
                continue
            e, h, i = expected[gate_path][0]
            _check_shape(key, file, handle.shape, (e, 2 * i, h))
            arr = handle.read()
            place(gate_path, np.transpose(arr[:, :i], (0, 2, 1)), source)
            place(up_path, np.transpose(arr[:, i:], (0, 2, 1)), source)
            continue
        nnx_path = _fill(rule.nnx, groups)
        if nnx_path not in expected:
            unexpected.append(key)
            continue
        shape = expected[nnx_path][0]
        _check_shape(key, file, handle.shape, _expected_torch_shape(rule.kind, shape))
        if rule.kind == "expert":
            idx = int(groups["expert"])
            if idx >= shape[0]:
                unexpected.append(key)
                continue
            if nnx_path not in expert_buffers:  # (setdefault would allocate a whole [E, ...] buffer per expert)
                expert_buffers[nnx_path] = (np.zeros(shape, np_dtype), np.zeros(shape[0], bool), source)
            buf, filled, _ = expert_buffers[nnx_path]
            if filled[idx]:
                raise CheckpointError(f"{file}: expert tensor {key!r} is given twice")
            buf[idx] = _to_nnx(rule.kind, handle.read()).astype(np_dtype, copy=False)
            filled[idx] = True
            continue
        place(nnx_path, _to_nnx(rule.kind, handle.read()), source)

    for nnx_path, (buf, filled, source) in expert_buffers.items():
        if not filled.all():
            missing = np.nonzero(~filled)[0].tolist()
            raise CheckpointError(f"parameter {nnx_path}: experts {missing} are missing from the checkpoint")
        place(nnx_path, buf, source)

    if unexpected:
        raise CheckpointError(f"unexpected key(s) in checkpoint (no parameter of this model takes them): "
                              f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    missing = [p for p in expected if p not in values]
    if missing:
        named = [_torch_name_for(matcher, p) for p in missing]
        raise CheckpointError(f"missing key(s) in checkpoint: {named[:20]}{' ...' if len(named) > 20 else ''}")
    return values


def _torch_name_for(matcher: _Matcher, nnx_path: str) -> str:
    rule, groups = matcher.match_nnx(nnx_path)
    if rule is None:
        return nnx_path
    if rule.kind == "expert":
        groups = dict(groups, expert="*")
        return rule.torch.format(**groups)
    return rule.torch.format(**groups)


def _check_shape(key, file, got, want):
    if tuple(got) != tuple(want):
        raise CheckpointError(
            f"{os.path.basename(file)}: key {key!r} has shape {tuple(got)} but the model expects {tuple(want)}")


def fill_state(abs_state, values: dict[str, jax.Array]):
    flat = nnx.to_flat_state(abs_state)
    for p, var in flat:
        var.set_value(values[_path_str(p)])
    return nnx.from_flat_state(flat)


def export_tensors(state, rules: tuple[KeyRule, ...]) -> dict[str, np.ndarray]:
    """Every variable of ``state`` under its checkpoint name and layout (per-expert names for stacked experts)."""
    matcher = _Matcher(rules)
    out: dict[str, np.ndarray] = {}
    for p, var in nnx.to_flat_state(state):
        path = _path_str(p)
        rule, groups = matcher.match_nnx(path)
        if rule is None:
            raise CheckpointError(f"parameter {path} has no checkpoint name (key table incomplete)")
        arr = np.asarray(jax.device_get(var.get_value()))
        if rule.kind == "expert":
            for e in range(arr.shape[0]):
                out[rule.torch.format(**dict(groups, expert=e))] = np.ascontiguousarray(arr[e].T)
        elif rule.kind == "transpose":
            out[rule.torch.format(**groups)] = np.ascontiguousarray(arr.T)
        else:
            out[rule.torch.format(**groups)] = arr
    return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


