"""Offline target cache: writing (:class:`TargetCacheWriter`, :func:`write_target_cache` with the target's forward)
and memory-mapped reading (:class:`TargetCache`) of DeepSpec's "version 2" layout, which
:mod:`dspark_jax.train.target_cache_format` describes; several processes write parts
(:mod:`dspark_jax.train.target_cache_parts`) that one merges."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dspark_jax import distributed
from dspark_jax.train.data import bucket_lengths
from dspark_jax.train.step import target_features
from dspark_jax.train.target_cache_format import (  # noqa: F401  (the format's names, importable from here too)
    _INDEX_DTYPE,
    _PROVENANCE_DEFAULTS,
    _REQUIRED_FIELDS,
    ARRAY_FIELDS,
    CACHE_VERSION,
    HIDDEN_DTYPES,
    INDEX_FILE,
    INDEX_RECORD,
    INDEX_RECORD_SIZE,
    MANIFEST_FILE,
    MASK_DTYPE,
    TOKEN_DTYPE,
    CacheError,
    CacheManifest,
    _atomic_write,
    _is_int,
    _require_little_endian,
    sample_nbytes,
    shard_file_name,
)
from dspark_jax.train.target_cache_parts import (
    merge_parts,
    part_directory,
    remove_parts,
)

__all__ = [
    "CACHE_VERSION",
    "INDEX_RECORD",
    "INDEX_RECORD_SIZE",
    "HIDDEN_DTYPES",
    "MANIFEST_FILE",
    "INDEX_FILE",
    "CacheError",
    "CacheManifest",
    "TargetCacheWriter",
    "write_target_cache",
    "TargetCache",
    "shard_file_name",
    "sample_nbytes",
]


# ----------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------


def _is_cache_file(name: str) -> bool:
    base = name[:-4] if name.endswith(".tmp") else name
    return base in (MANIFEST_FILE, INDEX_FILE) or (base.startswith("shard-") and base.endswith(".bin"))


def _prepare_directory(directory: str, overwrite: bool) -> None:
    """Creates ``directory``, or empties an existing cache there when ``overwrite`` (else refuses a non-empty one)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CacheError(f"target cache path exists and is not a directory: {directory}")
    os.makedirs(directory, exist_ok=True)
    entries = sorted(os.listdir(directory))
    if not entries:
        return
    if not overwrite:
        raise CacheError(f"target cache directory is not empty: {directory} (holds {entries[:5]}"
                         f"{' ...' if len(entries) > 5 else ''}); use a new directory or overwrite=True")
    # the manifest first: from here on the directory reads as a half-written cache, never as the old one
    ordered = sorted(entries, key=lambda n: n != MANIFEST_FILE)
    for name in ordered:
        if _is_cache_file(name) and os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))


class TargetCacheWriter:
    """Appends samples to a cache directory; context manager; close() writes samples.idx + manifest.json last
    (so a half-written cache has no manifest and is rejected by the reader).

    Leaving the ``with`` block by an exception closes the shard files *without* writing the index or the
    manifest (:meth:`abort`), so an interrupted run never produces a cache that looks complete.

    Args:
      directory: created if missing; must be empty unless ``overwrite`` (which deletes the cache files
        already there: manifest first, then index and shards; other files are left alone).
      target_layer_ids: tapped target layers, ascending (``-1`` = embeddings), as the draft config has them.
      hidden_size: the target's ``H``.
      target_model_name_or_path, data_paths, chat_template, max_length, min_loss_tokens: provenance written
        to the manifest (``min_loss_tokens`` is informational here; :func:`write_target_cache` applies it).
      max_shard_bytes: start a new shard before one would exceed this many bytes.
      hidden_dtype: storage dtype of the hidden states (a :data:`HIDDEN_DTYPES` name).
      extra_manifest: more JSON-able fields for the manifest (must not reuse a layout/provenance field name).
    """

    def __init__(self, directory: str | os.PathLike, *, target_layer_ids: Sequence[int], hidden_size: int,
                 target_model_name_or_path: str = "", data_paths: Iterable[str | os.PathLike] = (),
                 chat_template: str = "", max_length: int = 0, min_loss_tokens: int = 14,
                 max_shard_bytes: int = 64 << 30, hidden_dtype: str = "bfloat16", overwrite: bool = False,
                 extra_manifest: Mapping[str, Any] | None = None):
        _require_little_endian()
        if hidden_dtype not in HIDDEN_DTYPES:
            raise CacheError(f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}, got {hidden_dtype!r}")
        if int(max_shard_bytes) <= 0:
            raise CacheError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        extra = dict(extra_manifest or {})
        clash = sorted(set(extra) & (set(_REQUIRED_FIELDS) | set(_PROVENANCE_DEFAULTS)))
        if clash:
            raise CacheError(f"extra_manifest may not set layout/provenance field(s) {clash}")
        if isinstance(data_paths, (str, os.PathLike)):
            data_paths = [data_paths]
        self.directory = os.path.abspath(os.fspath(directory))
        # Validate the layout fields now (the same checks a reader applies), not after hours of writing.
        self._template = CacheManifest.from_dict({
            "version": CACHE_VERSION, "num_samples": 0, "num_shards": 0,
            "target_layer_ids": [int(i) if _is_int(i) else i for i in target_layer_ids],
            "hidden_dtype": hidden_dtype, "token_dtype": TOKEN_DTYPE, "mask_dtype": MASK_DTYPE,
            "index_record_size": INDEX_RECORD_SIZE, "hidden_size": hidden_size, "shards": [],
            "target_model_name_or_path": os.fspath(target_model_name_or_path or ""),
            "data_paths": [os.fspath(p) for p in data_paths], "chat_template": chat_template or "",
            "max_length": max_length, "min_loss_tokens": min_loss_tokens}, source="TargetCacheWriter arguments")
        self._extra = extra
        self.max_shard_bytes = int(max_shard_bytes)
        self._hidden_dtype = self._template.hidden_np_dtype
        _prepare_directory(self.directory, overwrite)
        self._index = bytearray()
        self._shard_files: list[str] = []
        self._shard = None  # open file of the current shard
        self._shard_size = 0
        self._num_samples = 0
        self._total_tokens = 0
        self._total_loss_tokens = 0
        self._manifest: CacheManifest | None = None
        self._closed = False

    # ---- public -------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._num_samples

    def add(self, input_ids, loss_mask, target_hidden_states, target_last_hidden_states, attention_mask=None,
            sample_id: int | None = None) -> int:
        """Appends one sample; returns its index in the cache.

        Args:
          input_ids: ``int[S]`` token ids (any integer dtype; stored as int32).
          loss_mask: ``[S]`` 0/1 (bool or integer; stored as uint8).
          target_hidden_states: ``[S, Lt*H]`` float (numpy or jax, any float dtype; cast to ``hidden_dtype``
            with round-to-nearest-even, as torch's ``.to(torch.bfloat16)``).
          target_last_hidden_states: ``[S, H]`` float, likewise.
          attention_mask: ``[S]`` 0/1; default all ones (samples are stored unpadded).
          sample_id: stored in the index record; default the sample's index (what DeepSpec's reader requires).
        """
        if self._closed:
            raise CacheError(f"writer for {self.directory} is already closed")
        arrays = self._validated_arrays(input_ids, loss_mask, target_hidden_states, target_last_hidden_states,
                                        attention_mask)
        seq_len = arrays["input_ids"].shape[0]
        index = self._num_samples
        sample_id = index if sample_id is None else sample_id
        if not _is_int(sample_id) or not 0 <= sample_id < 1 << 64:
            raise CacheError(f"sample_id must be an unsigned 64-bit integer, got {sample_id!r}")
        self._ensure_shard(sum(a.nbytes for a in arrays.values()))
        offsets = []
        for name in ARRAY_FIELDS:
            offsets.append(self._shard_size)
            self._write(arrays[name])
        self._index += INDEX_RECORD.pack(int(sample_id), len(self._shard_files) - 1, seq_len, *offsets)
        self._num_samples += 1
        self._total_tokens += seq_len
        self._total_loss_tokens += int(np.count_nonzero(arrays["loss_mask"]))
        return index

    def close(self) -> CacheManifest:
        """Finishes the shard, then writes ``samples.idx`` and, last, ``manifest.json``. Idempotent."""
        if self._manifest is not None:
            return self._manifest
        if self._closed:
            raise CacheError(f"writer for {self.directory} was aborted; the cache there is incomplete")
        self._close_shard()
        self._closed = True
        _atomic_write(os.path.join(self.directory, INDEX_FILE), bytes(self._index))
        manifest = dataclasses.replace(
            self._template, num_samples=self._num_samples, num_shards=len(self._shard_files),
            shards=tuple(enumerate(self._shard_files)),
            extra={"created_by": "dspark_jax", "total_tokens": self._total_tokens,
                   "total_loss_tokens": self._total_loss_tokens, **self._extra})
        payload = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
        _atomic_write(os.path.join(self.directory, MANIFEST_FILE), payload.encode("utf-8"))
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Closes the shard files without writing the index or manifest (the directory stays unreadable)."""
        if not self._closed:
            self._closed = True
            if self._shard is not None:
                self._shard.close()
                self._shard = None

    def __enter__(self) -> TargetCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- internals ----------------------------------------------------------------------------------------
    def _validated_arrays(self, input_ids, loss_mask, hidden, last, attention_mask) -> dict[str, np.ndarray]:
        ids = _as_token_ids(input_ids)
        s = ids.shape[0]
        out = {"input_ids": ids,
               "attention_mask": np.ones(s, np.uint8) if attention_mask is None
               else _as_mask(attention_mask, "attention_mask", s),
               "loss_mask": _as_mask(loss_mask, "loss_mask", s)}
        t = self._template
        taps_layout = f"[S, Lt*H] with Lt={t.num_taps}, H={t.hidden_size}"
        out["target_hidden_states"] = _as_hidden(hidden, "target_hidden_states", (s, t.tap_width),
                                                 self._hidden_dtype, taps_layout)
        out["target_last_hidden_states"] = _as_hidden(last, "target_last_hidden_states", (s, t.hidden_size),
                                                      self._hidden_dtype, f"[S, H] with H={t.hidden_size}")
        return out

    def _ensure_shard(self, nbytes: int) -> None:
        # Start a new shard when this sample would overflow a non-empty one (an oversized sample gets its own).
        if self._shard is None or (self._shard_size > 0 and self._shard_size + nbytes > self.max_shard_bytes):
            self._close_shard()
            name = shard_file_name(len(self._shard_files))
            self._shard = open(os.path.join(self.directory, name), "wb")
            self._shard_files.append(name)
            self._shard_size = 0

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            os.fsync(self._shard.fileno())  # shard bytes are durable before the index points at them
            self._shard.close()
            self._shard = None

    def _write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).view(np.uint8)
        self._shard.write(data.data)
        self._shard_size += data.nbytes


def _as_token_ids(x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] == 0:
        raise CacheError(f"input_ids: expected a non-empty 1-D array [S], got shape {a.shape}")
    if a.shape[0] >= 1 << 32:
        raise CacheError(f"input_ids: sequence length {a.shape[0]} does not fit the index's uint32 seq_len")
    if not np.issubdtype(a.dtype, np.integer):
        raise CacheError(f"input_ids: expected an integer dtype, got {a.dtype}")
    info = np.iinfo(np.int32)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise CacheError("input_ids: values do not fit int32")
    return a.astype("<i4", copy=False)


def _as_mask(x, name: str, seq_len: int) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != (seq_len,):
        raise CacheError(f"{name}: expected shape ({seq_len},) like input_ids, got {a.shape}")
    if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
        raise CacheError(f"{name}: expected a bool or integer 0/1 array, got dtype {a.dtype}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise CacheError(f"{name}: values must be 0 or 1")
    return a.astype(np.uint8)


def _as_hidden(x, name: str, shape: tuple[int, int], dtype: np.dtype, layout: str) -> np.ndarray:
    a = np.asarray(x)  # a jax array comes to the host here (bf16 jax -> ml_dtypes.bfloat16 numpy)
    if a.shape != shape:
        raise CacheError(f"{name}: expected shape {shape} ({layout}), got {a.shape}")
    try:
        ml_dtypes.finfo(a.dtype)
    except (TypeError, ValueError):
        raise CacheError(f"{name}: expected a floating-point array, got dtype {a.dtype}") from None
    return a.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------
# Producing a cache with a target
# ----------------------------------------------------------------------------------------------------------


def _check_samples(samples: Sequence[Mapping[str, Any]], vocab_size: int, max_length: int) -> list[int]:
    """Validates every sample up front (fail before running the target); returns their loss-token counts."""
    counts = []
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or "input_ids" not in s or "loss_mask" not in s:
            raise CacheError(f"sample {i}: expected a dict with 'input_ids' and 'loss_mask'")
        ids, mask = np.asarray(s["input_ids"]), np.asarray(s["loss_mask"])
        if ids.ndim != 1 or ids.shape[0] == 0 or mask.shape != ids.shape:
            raise CacheError(f"sample {i}: input_ids {ids.shape} and loss_mask {mask.shape} must be the same "
                             "non-empty 1-D length")
        if max_length and ids.shape[0] > max_length:
            raise CacheError(f"sample {i}: length {ids.shape[0]} > max_length {max_length}")
        # out-of-range ids would be clamped silently by the embedding gather: garbage features, no error
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab_size:
            raise CacheError(f"sample {i}: input_ids must be integers in [0, {vocab_size}) (target vocab)")
        counts.append(int(np.count_nonzero(mask)))
    return counts


def _make_forward(target, tap_layer_ids: tuple[int, ...], compiler_options):
    """``fwd(state, ids [B,S]) -> (taps [B,S,Lt*H], last [B,S,H])``: the train step's target call, jitted."""
    graphdef, state = nnx.split(target)

    def fwd(state, input_ids):
        return target_features(nnx.merge(graphdef, state), input_ids, tap_layer_ids)

    kw = {"compiler_options": dict(compiler_options)} if compiler_options else {}
    return functools.partial(jax.jit(fwd, **kw), state)


def _padded_batch(samples, rows: list[int], batch_size: int, width: int) -> np.ndarray:
    """``[batch_size, width]`` int32 ids, right-padded with 0 (short last batches padded with empty rows so
    the jitted forward sees one shape per bucket)."""
    ids = np.zeros((batch_size, width), np.int32)
    for r, i in enumerate(rows):
        x = np.asarray(samples[i]["input_ids"])
        ids[r, : x.shape[0]] = x
    return ids


def write_target_cache(directory: str | os.PathLike, samples: Sequence[Mapping[str, Any]], target, *,
                       target_layer_ids: Sequence[int], batch_size: int = 16, target_model_name_or_path: str = "",
                       progress: bool = True, min_bucket: int = 128,
                       compiler_options: Mapping[str, Any] | None = None, process_index: int = 0,
                       process_count: int = 1, **writer_kwargs) -> CacheManifest:
    """Runs the frozen target over `samples` (a sequence of {"input_ids": int[S], "loss_mask": uint8[S]} dicts,
    e.g. from dspark_jax.train.data.read_jsonl), batch_size at a time, right-padded to a bucket length, and
    writes each sample's taps / last hidden (first S rows only).

    The target is called exactly as the online train step calls it (:func:`~dspark_jax.train.step.target_features`:
    ``target(ids, tap_layer_ids=..., return_logits=False)`` -> taps ``[B,S,Lt*H]``, last_hidden ``[B,S,H]``),
    under ``jax.jit`` (graphdef closed over, weights as an argument). Batches are ``[batch_size, L]`` with ``L``
    the smallest of :func:`~dspark_jax.train.data.bucket_lengths` (powers of two from ``min_bucket``, then the
    longest length) that holds the batch, so the forward compiles at most once per bucket. Right padding leaves
    the real rows bit-identical: attention is causal, and with row-independent matmuls XLA produces the same
    values at any padded width (tested). Batch ``k+1`` is dispatched before batch ``k`` is written, so the host's
    writing overlaps the device's compute.

    Samples with fewer than ``min_loss_tokens`` (a writer kwarg, default 14) loss tokens are dropped, as in
    DeepSpec; the count goes to the manifest's ``dropped_short``. Kept samples keep their order and get
    sample ids 0..N-1. Every sample is validated (shapes, ids inside the target's vocab, ``max_length``) before
    the target runs.

    With ``process_count > 1`` every process of a ``jax.distributed`` run calls this with its index and the
    same samples: batch ``k`` goes to process ``k % process_count``, each process writes a part, and process 0
    merges the parts into one cache (:mod:`~dspark_jax.train.target_cache_parts`) whose samples are those of a
    one-process run. ``target`` must then live on this process's devices only.

    Args:
      directory: the cache directory (see :class:`TargetCacheWriter` for ``overwrite``).
      samples: the parsed samples.
      target: a target module (``Qwen3ForCausalLM``); its weights may already be placed on devices.
      target_layer_ids: layers to tap, ascending (the draft config's ``target_layer_ids``).
      batch_size: sequences per forward (DeepSpec: 16).
      target_model_name_or_path: recorded in the manifest; training checks it against its config.
      progress: show a tqdm bar (stderr).
      min_bucket: smallest padded length.
      compiler_options: XLA options for the forward's ``jax.jit``. The default (none) matches the train step.
        Note XLA fuses bf16 elementwise chains with f32 intermediates ("excess precision"), so a bf16 target's
        jitted features differ by a few bf16 ulp from an op-by-op (eager) call; pass
        ``{"xla_allow_excess_precision": False}`` to round after every op as eager JAX (and torch) do.
      **writer_kwargs: :class:`TargetCacheWriter` arguments (``data_paths``, ``chat_template``, ``max_length``,
        ``min_loss_tokens``, ``max_shard_bytes``, ``hidden_dtype``, ``overwrite``, ``extra_manifest``).
    Returns:
      the written manifest.
    """
    if batch_size <= 0:
        raise CacheError(f"batch_size must be positive, got {batch_size}")
    tap_ids = target.check_tap_layer_ids(target_layer_ids)
    min_loss_tokens = int(writer_kwargs.get("min_loss_tokens", 14))
    counts = _check_samples(samples, target.config.vocab_size, int(writer_kwargs.get("max_length", 0) or 0))
    keep = [i for i, c in enumerate(counts) if c >= min_loss_tokens]
    extra = {"dropped_short": len(samples) - len(keep), **dict(writer_kwargs.pop("extra_manifest", None) or {})}
    longest = max((len(samples[i]["input_ids"]) for i in keep), default=1)
    buckets = bucket_lengths(longest, min_bucket)
    forward = _make_forward(target, tap_ids, compiler_options)
    starts = list(range(0, len(keep), batch_size))[process_index::process_count]
    out_dir = directory
    if process_count > 1:
        out_dir = _prepare_parts(directory, process_index, process_count, bool(writer_kwargs.get("overwrite")))
        writer_kwargs = {**writer_kwargs, "overwrite": True}  # a part directory is ours alone

    with TargetCacheWriter(out_dir, target_layer_ids=tap_ids, hidden_size=target.config.hidden_size,
                           target_model_name_or_path=target_model_name_or_path, extra_manifest=extra,
                           **writer_kwargs) as writer, \
            _progress_bar(sum(len(keep[b:b + batch_size]) for b in starts), progress) as bar:
        pending = None
        for start in starts:
            rows = keep[start:start + batch_size]
            width = next(b for b in buckets if b >= max(len(samples[i]["input_ids"]) for i in rows))
            out = forward(_padded_batch(samples, rows, batch_size, width))  # async: returns before it's done
            if pending is not None:
                _write_batch(writer, samples, *pending, bar)
            pending = (start, rows, out)
        if pending is not None:
            _write_batch(writer, samples, *pending, bar)
    manifest = writer.close()
    if process_count == 1:
        return manifest

    distributed.barrier("dspark_jax.target_cache.parts_written")
    if process_index == 0:
        merge_parts(directory, process_count)
    distributed.barrier("dspark_jax.target_cache.merged")
    return CacheManifest.from_json(directory)


def _prepare_parts(directory, process_index: int, process_count: int, overwrite: bool) -> str:
    """Process 0 readies ``directory`` (emptied with ``overwrite``, else it must be empty); every process learns
    whether that worked, so all fail together. Returns this process's part directory."""
    error = ""
    if process_index == 0:
        try:
            if overwrite:
                remove_parts(directory)
            _prepare_directory(os.path.abspath(os.fspath(directory)), overwrite)
        except CacheError as e:
            error = str(e)
    failed = bool(distributed.broadcast_from_main(np.asarray(bool(error))))
    if failed:
        raise CacheError(error or f"process 0 could not prepare the target cache directory {directory}")
    return part_directory(directory, process_index, process_count)


def _write_batch(writer: TargetCacheWriter, samples, start: int, rows: list[int], out, bar) -> None:
    """Writes one batch; its samples' ids are their positions among the kept samples (``start`` + row)."""
    taps, last = jax.device_get(out)
    for r, i in enumerate(rows):
        s = len(samples[i]["input_ids"])
        writer.add(samples[i]["input_ids"], samples[i]["loss_mask"], taps[r, :s], last[r, :s], sample_id=start + r)
    bar.update(len(rows))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()

    return tqdm(total=total, desc="target-cache", unit="sample", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------


class TargetCache(collections.abc.Sequence):
    """Memory-mapped reader (numpy.memmap per shard, opened lazily). __len__, __getitem__(i) -> dict with
    "input_ids" int32[S], "attention_mask" uint8[S], "loss_mask" uint8[S], "target_hidden_states" [S, Lt*H],
    "target_last_hidden_states" [S, H] (ml_dtypes.bfloat16 numpy arrays, zero-copy views where possible).
    `.lengths` int64[N] array from the index (no shard reads). `.manifest`. Validates on open: manifest present,
    samples.idx size == num_samples*56, every shard file present, every record's offsets/lengths inside its shard
    (CacheError naming the sample and shard).

    The arrays are read-only views into the shard's page cache (the storage has no alignment, so a view may
    be unaligned; numpy handles that, and ``np.array(x)`` / ``jnp.asarray(x)`` copy out). Hidden states come
    in the manifest's ``hidden_dtype`` (``ml_dtypes.bfloat16`` by default). Pickling drops the open maps (they
    reopen lazily), so the reader can go to data-loader workers. ``cache[a:b]`` gives a list of samples.
    """

    def __init__(self, directory: str | os.PathLike):
        _require_little_endian()
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"target cache directory not found: {self.directory}")
        manifest_path = os.path.join(self.directory, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise CacheError(f"{self.directory} has no {MANIFEST_FILE}: not a target cache, or an unfinished "
                             "one (the manifest is written last, when the writer closes); rebuild it")
        self.manifest = CacheManifest.from_json(manifest_path)
        self._index = self._read_index()
        self._shard_sizes = self._check_shards()
        self._check_records()
        self.lengths = self._index["seq_len"].astype(np.int64)
        self.lengths.setflags(write=False)
        self._maps: dict[int, np.memmap] = {}

    # ---- public -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(np.asarray(index)) if isinstance(index, np.ndarray) else index.__index__()
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {index} out of range for a cache of {n} samples")
        rec = self._index[i % n]
        buf = self._shard(int(rec["shard_id"]))
        s, m = int(rec["seq_len"]), self.manifest
        hid = m.hidden_np_dtype
        spec = {"input_ids": (np.dtype("<i4"), (s,)), "attention_mask": (np.dtype(np.uint8), (s,)),
                "loss_mask": (np.dtype(np.uint8), (s,)), "target_hidden_states": (hid, (s, m.tap_width)),
                "target_last_hidden_states": (hid, (s, m.hidden_size))}
        return {name: np.frombuffer(buf, dtype, count=int(np.prod(shape)), offset=int(rec[name])).reshape(shape)
                for name, (dtype, shape) in spec.items()}

    @property
    def sample_ids(self) -> np.ndarray:
        """``uint64[N]`` the index's sample ids (0..N-1 for caches written by this module or DeepSpec)."""
        return self._index["sample_id"]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def check_compatible(self, *, target_layer_ids: Sequence[int], hidden_size: int,
                         target_model_name_or_path: str | None = None) -> None:
        """Raises :class:`CacheError` if this cache was made for another target / tap set than the config's.

        Layer ids and hidden size must match; the target name is compared only when both sides have one (a
        local path and a hub name for the same model would differ as strings).
        """
        m = self.manifest
        problems = []
        if tuple(int(i) for i in target_layer_ids) != m.target_layer_ids:
            problems.append(f"target_layer_ids: cache {list(m.target_layer_ids)} vs config "
                            f"{[int(i) for i in target_layer_ids]}")
        if int(hidden_size) != m.hidden_size:
            problems.append(f"hidden_size: cache {m.hidden_size} vs config {int(hidden_size)}")
        if target_model_name_or_path and m.target_model_name_or_path and \
                str(target_model_name_or_path) != m.target_model_name_or_path:
            problems.append(f"target_model_name_or_path: cache {m.target_model_name_or_path!r} vs config "
                            f"{str(target_model_name_or_path)!r}")
        if problems:
            raise CacheError(f"target cache {self.directory} does not match the training config: "
                             + "; ".join(problems) + ". Rebuild the cache for this target, or fix the config.")

    def close(self) -> None:
        """Drops the shard maps (they reopen on the next access)."""
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TargetCache({self.directory!r}, samples={m.num_samples}, shards={m.num_shards}, "
                f"layers={list(m.target_layer_ids)}, hidden_size={m.hidden_size}, dtype={m.hidden_dtype})")

    # ---- opening and validation ---------------------------------------------------------------------------
    def _shard(self, shard_id: int) -> np.memmap:
        mm = self._maps.get(shard_id)
        if mm is None:
            path = os.path.join(self.directory, self.manifest.shard_file(shard_id))
            mm = self._maps[shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
        return mm

    def _read_index(self) -> np.ndarray:
        path = os.path.join(self.directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise CacheError(f"target cache index missing: {path}")
        size, n = os.path.getsize(path), self.manifest.num_samples
        if size != n * INDEX_RECORD_SIZE:
            raise CacheError(f"{path} is {size} bytes but the manifest's num_samples={n} needs "
                             f"{n} * {INDEX_RECORD_SIZE} = {n * INDEX_RECORD_SIZE} (truncated or mismatched)")
        return np.fromfile(path, dtype=_INDEX_DTYPE, count=n)

    def _check_shards(self) -> np.ndarray:
        sizes = []
        for shard_id, name in self.manifest.shards:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                users = int(np.count_nonzero(self._index["shard_id"] == shard_id))
                raise CacheError(f"target cache shard {shard_id} missing: {path} ({users} samples point to it)")
            sizes.append(os.path.getsize(path))
        return np.asarray(sizes, np.uint64)

    def _check_records(self) -> None:
        """Vectorised bounds check of every record (fast for millions of samples)."""
        idx, m = self._index, self.manifest
        if not len(idx):
            return
        self._fail_first(idx["seq_len"] == 0, "has seq_len 0")
        self._fail_first(idx["shard_id"] >= m.num_shards, f"points to a shard id >= num_shards={m.num_shards}")
        seq = idx["seq_len"].astype(np.uint64)
        item = np.uint64(m.hidden_np_dtype.itemsize)
        nbytes = {"input_ids": 4 * seq, "attention_mask": seq, "loss_mask": seq,
                  "target_hidden_states": seq * np.uint64(m.tap_width) * item,
                  "target_last_hidden_states": seq * np.uint64(m.hidden_size) * item}
        size = self._shard_sizes[idx["shard_id"]]
        for name in ARRAY_FIELDS:
            off = idx[name]
            # written so uint64 can't wrap: off <= size, then nbytes <= size - off
            inside = (off <= size) & (nbytes[name] <= size - np.minimum(off, size))
            self._fail_first(~inside, f"has {name} bytes outside its shard", field=name, nbytes=nbytes[name])

    def _fail_first(self, bad: np.ndarray, what: str, field: str | None = None, nbytes=None) -> None:
        if not bad.any():
            return
        i = int(np.argmax(bad))
        rec = self._index[i]
        sid = int(rec["shard_id"])
        where = self.manifest.shard_file(sid) if sid < self.manifest.num_shards else f"shard {sid}"
        detail = ""
        if field is not None:
            off = int(rec[field])
            detail = f" [{off}, {off + int(nbytes[i])}) but {where} is {int(self._shard_sizes[sid])} bytes"
        raise CacheError(f"{os.path.join(self.directory, INDEX_FILE)}: record {i} (sample_id {int(rec['sample_id'])}, "
                         f"seq_len {int(rec['seq_len'])}, {where}) {what}{detail}; "
                         f"{int(np.count_nonzero(bad))} record(s) affected")
