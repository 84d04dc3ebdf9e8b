"""Offline target cache: DeepSpec's "version 2" on-disk layout (spec §3.2), written and memory-mapped here.

Training from a cache replaces the frozen target's forward in every step with a read of its precomputed
features. A cache is a directory::

    manifest.json        written last: a directory without it is a half-written cache and is rejected
    samples.idx          one 56-byte little-endian record per sample (struct "<QIIQQQQQ")
    shard-00000.bin      the samples' arrays, back to back, no padding or alignment
    shard-00001.bin      ...

``samples.idx`` record (all little-endian; offsets are bytes from the start of that sample's shard file)::

    Q sample_id   I shard_id   I seq_len (S)
    Q input_ids   Q attention_mask   Q loss_mask   Q target_hidden_states   Q target_last_hidden_states

Per sample the shard holds, contiguously and in this order (``Lt`` = len(target_layer_ids), ``H`` = hidden_size)::

    input_ids                  int32   [S]          4*S bytes
    attention_mask             uint8   [S]          S bytes (all ones: samples are stored unpadded)
    loss_mask                  uint8   [S]          S bytes
    target_hidden_states       hidden  [S, Lt*H]    row-major; per token the tapped layers in target_layer_ids
                                                    order (each tap's H values together)
    target_last_hidden_states  hidden  [S, H]       the final post-norm hidden state (the lm_head input)

``hidden`` is ``manifest["hidden_dtype"]``: ``"bfloat16"`` (DeepSpec's default, 2 bytes). DeepSpec also writes
``"float8_e4m3fn"`` / ``"float8_e5m2"`` (1 byte), which this module reads and writes too. ``"float32"`` (4 bytes)
is our extension for exact-numerics experiments: DeepSpec's reader only understands the other three (it would
reject such a manifest), so keep the default for caches meant to be shared with it.

A sample never straddles two shards; a new shard is started when the next sample would push the current one
past ``max_shard_bytes`` (64 GiB by default). As in DeepSpec, a single sample bigger than that limit still gets
a shard of its own rather than failing a long run.

``manifest.json`` (``json.dump(indent=2, sort_keys=True)``, replaced atomically) has ``version`` = 2,
``num_samples``, ``num_shards``, ``target_layer_ids``, ``hidden_dtype``, ``token_dtype`` = "int32",
``mask_dtype`` = "uint8", ``index_record_size`` = 56, ``hidden_size``, ``shards`` = [{"shard_id", "file_name"}]
(ids 0..n-1 in order), and the provenance fields ``target_model_name_or_path``, ``data_paths``,
``chat_template``, ``max_length``, ``min_loss_tokens``. Our writer adds ``created_by``, ``total_tokens``,
``total_loss_tokens`` (and :func:`write_target_cache` ``dropped_short``); readers ignore fields they don't
know (:attr:`CacheManifest.extra` keeps them).

Compatibility with DeepSpec's reader: it requires ``sample_id`` == the record's position (dense, ordered),
ascending ``target_layer_ids`` and ``shard_id`` == position in ``shards``. The writer here produces exactly that
unless a caller passes its own ``sample_id`` to :meth:`TargetCacheWriter.add`; our reader does not require
dense sample ids (see :attr:`TargetCache.sample_ids`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CACHE_VERSION", "INDEX_RECORD", "INDEX_RECORD_SIZE", "HIDDEN_DTYPES", "MANIFEST_FILE", "INDEX_FILE",
           "CacheError", "CacheManifest", "shard_file_name", "sample_nbytes"]

CACHE_VERSION = 2
INDEX_RECORD = struct.Struct("<QIIQQQQQ")
INDEX_RECORD_SIZE = INDEX_RECORD.size  # 56
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "samples.idx"
TOKEN_DTYPE, MASK_DTYPE = "int32", "uint8"

HIDDEN_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),  # DeepSpec's default
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),  # DeepSpec option
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),  # DeepSpec option
    "float32": np.dtype(np.float32),  # our extension: DeepSpec's reader rejects it
}
"""Manifest ``hidden_dtype`` name -> numpy dtype of the stored hidden states."""

# The five arrays of a sample, in storage order (also the names of the index's offset fields).
ARRAY_FIELDS = ("input_ids", "attention_mask", "loss_mask", "target_hidden_states", "target_last_hidden_states")

# samples.idx as a numpy structured dtype: packed (no alignment), so itemsize == the struct's 56 bytes.
_INDEX_DTYPE = np.dtype([("sample_id", "<u8"), ("shard_id", "<u4"), ("seq_len", "<u4")]
                        + [(name, "<u8") for name in ARRAY_FIELDS])
assert _INDEX_DTYPE.itemsize == INDEX_RECORD_SIZE == 56

_REQUIRED_FIELDS = ("version", "num_samples", "num_shards", "target_layer_ids", "hidden_dtype", "token_dtype",
                    "mask_dtype", "index_record_size", "hidden_size", "shards")
_PROVENANCE_DEFAULTS = {"target_model_name_or_path": "", "data_paths": (), "chat_template": "", "max_length": 0,
                        "min_loss_tokens": 14}


class CacheError(ValueError):
    """A target cache that can't be written or read as asked (the message names the file, field or sample)."""


def _require_little_endian() -> None:
    # The bf16 / float8 arrays are written and viewed in native byte order; the format is little-endian.
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise CacheError("the target cache format is little-endian; this host is big-endian")


def shard_file_name(shard_id: int) -> str:
    """``shard-00007.bin`` for shard 7 (5 digits, zero padded, as DeepSpec names them)."""
    return f"shard-{int(shard_id):05d}.bin"


def sample_nbytes(seq_len: int, num_taps: int, hidden_size: int, hidden_dtype: str = "bfloat16") -> dict[str, int]:
    """Byte size of each of a sample's five arrays (in storage order)."""
    item = HIDDEN_DTYPES[hidden_dtype].itemsize
    s = int(seq_len)
    return {"input_ids": 4 * s, "attention_mask": s, "loss_mask": s,
            "target_hidden_states": item * s * int(num_taps) * int(hidden_size),
            "target_last_hidden_states": item * s * int(hidden_size)}


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class CacheManifest:
    """A parsed, validated ``manifest.json``.

    ``shards`` is ``((shard_id, file_name), ...)`` with ``shard_id`` == position. ``extra`` holds every field
    this class doesn't model (``created_by``, ``total_tokens``, ``dropped_short``, DeepSpec's own additions ...)
    so :meth:`to_json` writes them back unchanged.
    """

    num_samples: int
    num_shards: int
    target_layer_ids: tuple[int, ...]
    hidden_size: int
    shards: tuple[tuple[int, str], ...]
    hidden_dtype: str = "bfloat16"
    token_dtype: str = TOKEN_DTYPE
    mask_dtype: str = MASK_DTYPE
    index_record_size: int = INDEX_RECORD_SIZE
    version: int = CACHE_VERSION
    target_model_name_or_path: str = ""
    data_paths: tuple[str, ...] = ()
    chat_template: str = ""
    max_length: int = 0
    min_loss_tokens: int = 14
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def num_taps(self) -> int:
        """``Lt``: how many target layers are tapped."""
        return len(self.target_layer_ids)

    @property
    def tap_width(self) -> int:
        """``Lt*H``: the last dimension of ``target_hidden_states``."""
        return self.num_taps * self.hidden_size

    @property
    def hidden_np_dtype(self) -> np.dtype:
        return HIDDEN_DTYPES[self.hidden_dtype]

    def shard_file(self, shard_id: int) -> str:
        return self.shards[int(shard_id)][1]

    def sample_nbytes(self, seq_len: int) -> dict[str, int]:
        return sample_nbytes(seq_len, self.num_taps, self.hidden_size, self.hidden_dtype)

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-able dict (the modelled fields override same-named ``extra`` entries)."""
        d = dict(self.extra)
        d.update(version=self.version, num_samples=self.num_samples, num_shards=self.num_shards,
                 target_layer_ids=list(self.target_layer_ids), hidden_dtype=self.hidden_dtype,
                 token_dtype=self.token_dtype, mask_dtype=self.mask_dtype,
                 index_record_size=self.index_record_size, hidden_size=self.hidden_size,
                 shards=[{"shard_id": i, "file_name": f} for i, f in self.shards],
                 target_model_name_or_path=self.target_model_name_or_path, data_paths=list(self.data_paths),
                 chat_template=self.chat_template, max_length=self.max_length,
                 min_loss_tokens=self.min_loss_tokens)
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CacheManifest:
        """Reads and validates ``path`` (a ``manifest.json`` or a cache directory holding one).

        Raises ``FileNotFoundError`` (naming the path) if there is no such file, :class:`CacheError` (naming the
        field and the file) if it is not a valid version-2 manifest.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"target cache manifest not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> CacheManifest:
        """Validates a manifest dict (``source`` names it in errors)."""
        if not isinstance(data, Mapping):
            raise CacheError(f"{source}: manifest must be a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED_FIELDS if k not in data]
        if missing:
            raise CacheError(f"{source}: missing required field(s) {missing}")

        def bad(field: str, why: str) -> CacheError:
            return CacheError(f"{source}: field {field!r} {why} (got {data.get(field)!r})")

        def nonneg_int(field: str) -> int:
            if not _is_int(data[field]) or data[field] < 0:
                raise bad(field, "must be a non-negative integer")
            return int(data[field])

        if data["version"] != CACHE_VERSION or not _is_int(data["version"]):
            raise bad("version", f"must be {CACHE_VERSION} (only the version-2 layout is supported)")
        if data["index_record_size"] != INDEX_RECORD_SIZE or not _is_int(data["index_record_size"]):
            raise bad("index_record_size", f"must be {INDEX_RECORD_SIZE} (struct '<QIIQQQQQ')")
        if data["hidden_dtype"] not in HIDDEN_DTYPES:
            raise bad("hidden_dtype", f"must be one of {sorted(HIDDEN_DTYPES)}")
        if data["token_dtype"] != TOKEN_DTYPE:
            raise bad("token_dtype", f"must be {TOKEN_DTYPE!r}")
        if data["mask_dtype"] != MASK_DTYPE:
            raise bad("mask_dtype", f"must be {MASK_DTYPE!r}")
        num_samples, num_shards = nonneg_int("num_samples"), nonneg_int("num_shards")
        hidden_size = nonneg_int("hidden_size")
        if hidden_size == 0:
            raise bad("hidden_size", "must be positive")
        layer_ids = _parse_layer_ids(data["target_layer_ids"], lambda why: bad("target_layer_ids", why))
        shards = _parse_shards(data["shards"], num_shards, lambda why: bad("shards", why))
        prov = _parse_provenance(data, bad)
        modelled = set(_REQUIRED_FIELDS) | set(_PROVENANCE_DEFAULTS)
        extra = {k: v for k, v in data.items() if k not in modelled}
        return cls(num_samples=num_samples, num_shards=num_shards, target_layer_ids=layer_ids,
                   hidden_size=hidden_size, shards=shards, hidden_dtype=data["hidden_dtype"], extra=extra, **prov)


def _parse_layer_ids(value, bad) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(i) for i in value):
        raise bad("must be a non-empty list of integers")
    ids = tuple(int(i) for i in value)
    if list(ids) != sorted(ids):
        raise bad("must be in ascending order (DeepSpec's reader requires it)")
    return ids


def _parse_shards(value, num_shards: int, bad) -> tuple[tuple[int, str], ...]:
    if not isinstance(value, list) or len(value) != num_shards:
        raise bad(f"must be a list of num_shards={num_shards} entries")
    out = []
    for pos, entry in enumerate(value):
        if not isinstance(entry, Mapping) or entry.get("shard_id") != pos or not _is_int(entry.get("shard_id")):
            raise bad(f"entry {pos} must be an object with shard_id == {pos} (ids contiguous from 0, in order)")
        name = entry.get("file_name")
        # a bare file name: a manifest must not point outside its own directory
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise bad(f"entry {pos} needs a plain file_name inside the cache directory")
        out.append((pos, name))
    return tuple(out)


def _parse_provenance(data: Mapping, bad) -> dict[str, Any]:
    """The provenance fields (optional: they don't affect reading; defaults when a writer left them out)."""
    out = {k: data.get(k, v) for k, v in _PROVENANCE_DEFAULTS.items()}
    if out["target_model_name_or_path"] is None:
        out["target_model_name_or_path"] = ""
    if out["chat_template"] is None:
        out["chat_template"] = ""
    for k in ("target_model_name_or_path", "chat_template"):
        if not isinstance(out[k], str):
            raise bad(k, "must be a string")
    paths = out["data_paths"]
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise bad("data_paths", "must be a list of strings")
    out["data_paths"] = tuple(paths)
    for k in ("max_length", "min_loss_tokens"):
        if not _is_int(out[k]) or out[k] < 0:
            raise bad(k, "must be a non-negative integer")
        out[k] = int(out[k])
    return out


def _atomic_write(path: str, payload: bytes) -> None:
    """Writes ``path`` via a temporary file + fsync + rename, so readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
