"""A target cache written by several processes: one part per process, merged into one version-2 cache.

Process ``p`` of ``P`` writes the batches dealt to it into ``<cache>/part-<p>-of-<P>/`` -- a complete cache of
its own (:class:`~dspark_jax.train.target_cache.TargetCacheWriter`) whose ``sample_id`` s are the samples'
positions in the whole cache. Process 0 then merges: each part's shard files move up into ``<cache>`` under
the next global shard numbers (part 0's first), the index records are re-pointed at them and sorted by sample
id, and ``samples.idx`` + ``manifest.json`` are written last (so the merged cache is complete or unreadable,
as with one writer). Sample ``i`` of the merged cache is sample ``i`` of a one-process cache, bit for bit;
only which shard file holds it differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from dspark_jax.train.target_cache_format import (
    _INDEX_DTYPE,
    INDEX_FILE,
    MANIFEST_FILE,
    CacheError,
    CacheManifest,
    _atomic_write,
    shard_file_name,
)


def part_directory(directory: str | os.PathLike, process_index: int, process_count: int) -> str:
    return os.path.join(os.fspath(directory), f"part-{process_index:05d}-of-{process_count:05d}")


def remove_parts(directory: str | os.PathLike) -> None:
    """Deletes part directories an interrupted multi-process run left in ``directory``."""
    directory = os.fspath(directory)
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith("part-") and "-of-" in name and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name))


def merge_parts(directory: str | os.PathLike, process_count: int) -> CacheManifest:
    """Merges the ``process_count`` parts in ``directory`` into the cache there; removes the parts."""
    directory = os.fspath(directory)
    parts = [part_directory(directory, p, process_count) for p in range(process_count)]
    manifests = [CacheManifest.from_json(p) for p in parts]  # FileNotFoundError names a missing part
    records, shards = [], []
    for part, manifest in zip(parts, manifests):
        index = np.fromfile(os.path.join(part, INDEX_FILE), dtype=_INDEX_DTYPE)
        if len(index) != manifest.num_samples:
            raise CacheError(f"{part}: {len(index)} index records for {manifest.num_samples} samples")
        index = index.copy()
        index["shard_id"] += len(shards)
        records.append(index)
        for _, name in manifest.shards:
            new = shard_file_name(len(shards))
            os.replace(os.path.join(part, name), os.path.join(directory, new))
            shards.append(new)
    index = np.concatenate(records) if records else np.zeros(0, _INDEX_DTYPE)
    index = index[np.argsort(index["sample_id"], kind="stable")]
    if not np.array_equal(index["sample_id"], np.arange(len(index))):
        raise CacheError(f"{directory}: the parts' sample ids are not 0..{len(index) - 1} once each")
    total = {k: sum(int(m.extra.get(k, 0)) for m in manifests) for k in ("total_tokens", "total_loss_tokens")}
    manifest = dataclasses.replace(manifests[0], num_samples=len(index), num_shards=len(shards),
                                   shards=tuple(enumerate(shards)), extra={**manifests[0].extra, **total})
    _atomic_write(os.path.join(directory, INDEX_FILE), index.tobytes())
    payload = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    _atomic_write(os.path.join(directory, MANIFEST_FILE), payload.encode("utf-8"))
    for part in parts:
        shutil.rmtree(part)
    return manifest


__all__ = ["part_directory", "remove_parts", "merge_parts"]
