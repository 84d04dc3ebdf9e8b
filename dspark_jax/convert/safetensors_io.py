"""Reading and writing safetensors shards with numpy (no torch), with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model; the message names file and key."""


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint dir: from the index if there is one, else all ``*.safetensors``."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return [os.path.join(directory, f) for f in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory!r}")
    return [os.path.join(directory, f) for f in files]


def iter_tensors(files: list[str]) -> Iterator[tuple[str, str, "TensorHandle"]]:
    """Yields ``(file, key, handle)`` one tensor at a time; ``handle.shape`` is known before reading."""
    seen: dict[str, str] = {}
    for path in files:
        try:
            handle = safe_open(path, framework="numpy")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header (truncated or corrupt?): {e}") from None
        for key in keys:
            if key in seen:
                raise CheckpointError(f"key {key!r} appears in both {seen[key]} and {path}")
            seen[key] = path
            yield path, key, TensorHandle(handle, path, key)


class TensorHandle:
    def __init__(self, handle, path: str, key: str):
        self._handle, self.path, self.key = handle, path, key

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(self.key).get_shape())

    @property
    def dtype(self) -> str:
        """The safetensors dtype name (``"F32"``, ``"BF16"``, ``"F8_E4M3"``, ...)."""
        return self._handle.get_slice(self.key).get_dtype()

    def read(self) -> np.ndarray:
        try:
            if self.dtype in _RAW_DTYPES:
                return _read_raw(self.path, self.key)
            return self._handle.get_tensor(self.key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.key!r} (truncated or corrupt?): "
                                  f"{e}") from None


def _raw_dtypes() -> dict:
    return {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


# dtypes safetensors' numpy backend cannot return (FP8 checkpoints): read from the file's byte ranges instead
_RAW_DTYPES = _raw_dtypes()


def _read_raw(path: str, key: str) -> np.ndarray:
    """One tensor straight from a safetensors file (8-byte header length, JSON header, data), memory-mapped."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    info = header[key]
    begin, end = info["data_offsets"]
    dtype = _RAW_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"data range {begin}..{end} does not hold shape {shape} of {info['dtype']}")
    return np.array(np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + begin, shape=(end - begin,))
                    .view(dtype).reshape(shape))


def save_shards(tensors: Mapping[str, np.ndarray], directory: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors as ``model.safetensors`` or, past ``max_shard_bytes``, numbered shards plus an index."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(arr)
        size += arr.nbytes
    # stale files from an earlier save would be picked up by the *.safetensors fallback
    for name in os.listdir(directory):
        if (name.startswith("model") and name.endswith(".safetensors")) or name == INDEX_NAME:
            os.remove(os.path.join(directory, name))
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(directory, n) for n in names]


def write_checkpoint_dir(path: str, tensors: Mapping[str, np.ndarray], config: Mapping, tokenizer=None, *,
                         max_shard_bytes: int = 5 * 2**30) -> str:
    """A directory ``from_pretrained`` reads: the tensors (one file or shards + index), ``config.json`` and, when
    given, the tokenizer's files."""
    save_shards(tensors, path, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
