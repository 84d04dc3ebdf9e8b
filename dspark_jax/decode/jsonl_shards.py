"""Per-host shards of a resumable JSONL output (``generate-data`` on several processes).

Process ``p`` of ``P`` (also the one process of a 1-process run) appends its records to ``<output>.shard-<p>-of-<P>``
as they finish (same line format and crash safety as the output itself); at the end process 0 folds the shards
into ``<output>`` in a given id order and removes them.
Shards left by an interrupted run (of any process count) are folded in first, so a resume sees every finished
record in ``<output>`` alone.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Iterator

_SUFFIX = ".shard-"


def shard_path(output: str | os.PathLike, process_index: int, process_count: int) -> str:
    return f"{os.fspath(output)}{_SUFFIX}{process_index:05d}-of-{process_count:05d}"


def existing_shards(output: str | os.PathLike) -> list[str]:
    return sorted(glob.glob(glob.escape(os.fspath(output)) + _SUFFIX + "*-of-*"))


def _complete_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of each whole, non-blank line of ``path`` (a partial last line, from a crash mid-write,
    is left out), read as a stream."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield offset, line
            offset += len(line)


def _record_id(line: bytes) -> str | None:
    try:
        return str(json.loads(line)["id"])
    except (ValueError, KeyError, TypeError):
        return None


def fold_shards(output: str | os.PathLike, order: Iterable[str] | None = None) -> int:
    """Appends the records of every shard of ``output`` that ``output`` does not hold yet, in ``order`` (ids;
    records not in it follow in shard order), then deletes the shards. Returns the number of records added.
    Call on one process only. ``output``'s own partial last line, if any, must already be cut away."""
    output = os.fspath(output)
    shards = existing_shards(output)
    if not shards:
        return 0
    have: set[str] = set()
    if os.path.exists(output):
        have = {i for i in (_record_id(line) for _, line in _complete_lines(output)) if i is not None}
    found: dict[str, tuple[str, int, int]] = {}   # id -> (shard, offset, length): records stay on disk
    for shard in shards:
        for offset, line in _complete_lines(shard):
            rid = _record_id(line)
            if rid is not None and rid not in have:
                found.setdefault(rid, (shard, offset, len(line)))
    ordered = [rid for rid in dict.fromkeys(order or ()) if rid in found]
    placed = set(ordered)
    ordered += [rid for rid in found if rid not in placed]
    handles = {shard: open(shard, "rb") for shard in shards}
    try:
        with open(output, "ab") as f:
            for rid in ordered:
                shard, offset, length = found[rid]
                src = handles[shard]
                src.seek(offset)
                f.write(src.read(length))
            f.flush()
            os.fsync(f.fileno())
    finally:
        for h in handles.values():
            h.close()
    for shard in shards:
        os.remove(shard)
    return len(ordered)


__all__ = ["shard_path", "existing_shards", "fold_shards"]
