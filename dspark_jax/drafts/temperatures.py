"""STS temperatures on disk (``sts_temperatures.json`` beside a draft's weights, written by ``dspark calibrate``) and
on a draft (``draft.sts_temperatures``): what loading and saving a draft carry along. The fitting itself is
:mod:`dspark_jax.decode.calibrate`."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

TEMPERATURES_FILE = "sts_temperatures.json"
FORMAT = "dspark-sts-v1"


def check_temperatures(temps, where: str = "temperatures") -> tuple[float, ...]:
    t = tuple(float(x) for x in temps)
    if not t or not all(math.isfinite(x) and x > 0 for x in t):
        raise ValueError(f"{where}: STS temperatures must be a non-empty list of finite numbers > 0, got {list(t)}")
    return t


def save_temperatures(path: str | os.PathLike, temperatures: Sequence[float],
                      extra: dict[str, Any] | None = None) -> str:
    """Writes ``{"format", "temperatures", ...extra}``; a directory gets ``sts_temperatures.json`` inside."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TEMPERATURES_FILE)
    obj = {"format": FORMAT, "temperatures": list(check_temperatures(temperatures)), **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    return path


def load_temperatures(path: str | os.PathLike) -> tuple[float, ...]:
    """Temperatures from a JSON file (``{"temperatures": [...]}`` or a list) or a directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TEMPERATURES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no STS temperatures at {path!r} (run `dspark calibrate` to write them)")
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    temps = obj.get("temperatures") if isinstance(obj, dict) else obj
    if not isinstance(temps, list):
        raise ValueError(f"{path}: expected {{'temperatures': [T_1, ..., T_Bs]}}")
    return check_temperatures(temps, path)


def attach_temperatures(draft, temperatures: Sequence[float] | None):
    """Sets ``draft.sts_temperatures`` (a static tuple: part of the draft's graph, hence of the jit key)."""
    draft.sts_temperatures = None if temperatures is None else check_temperatures(temperatures)
    return draft


def attach_saved_temperatures(draft, draft_dir: str | os.PathLike):
    """Attaches ``<draft_dir>/sts_temperatures.json`` when it exists (called by ``dj.load_draft``)."""
    path = os.path.join(os.fspath(draft_dir), TEMPERATURES_FILE)
    if os.path.isfile(path):
        temps = load_temperatures(path)
        if getattr(draft.config, "has_confidence", False):
            want = draft.config.block_size
            if len(temps) != want:
                raise ValueError(f"{path}: {len(temps)} temperatures for a draft with block_size {want}")
            attach_temperatures(draft, temps)
    return draft


def resolve_temperatures(calibration, draft) -> tuple[float, ...] | None:
    """``speculative_generate``'s ``calibration=``: None -> the draft's attached temperatures (or none);
    False -> none; a path -> :func:`load_temperatures`; a sequence -> those temperatures."""
    if calibration is None:
        temps = getattr(draft, "sts_temperatures", None)
        return None if temps is None else tuple(temps)
    if calibration is False:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        return load_temperatures(calibration)
    if calibration is True:
        raise ValueError("calibration=True is ambiguous: pass None (the draft's own), a path or temperatures")
    return check_temperatures(calibration, "calibration")
