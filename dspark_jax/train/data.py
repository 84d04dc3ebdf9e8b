"""Training data: JSONL conversations -> (input_ids, loss_mask), and a resumable sharded batch pipeline.

Spec §3.1 (JSONL format, parser, loss-mask span rule), §2 "Parser" (Gemma4 thought-channel prefix is not
supervised), §3.5 (sampler) and §8.13 (data invariants).

Parsing (:func:`parse_conversation`):
  1. keep a leading system message, otherwise prepend the format's default system prompt (if it has one);
  2. the first non-system turn must be a user turn; roles are system/user/assistant/tool;
  3. ``tool_calls`` given as a JSON string are decoded;
  4. render with the tokenizer's chat template (``add_generation_prompt=False``), tokenize without adding
     special tokens, truncate to ``max_length``;
  5. loss mask: every assistant header followed by the shortest text that ends with the end-of-turn string
     (or at the end of the text) is a loss span; character spans become token spans by re-tokenizing
     ``text[:start]`` and ``text[:end]``. The span therefore contains the assistant content, the end-of-turn
     token and its trailing newline (and, for Qwen3, the ``<think>\\n\\n</think>\\n\\n`` block the template
     writes into the final assistant turn). When the chat template marks assistant text with
     ``{% generation %}``, that mask can be used instead (``mask_source``).

Batching (:class:`InputPipeline`): epoch ``e`` uses the first ``G*floor(N/G)`` entries of a permutation of
``range(N)`` seeded with ``seed+e`` (``G`` = global batch size, seed 42); the epochs stream back to back.
Yielded step ``k`` covers rows ``[j*M, (j+1)*M)`` of its epoch's order (``M`` = micro batch size, global over
processes); process ``r`` of ``P`` takes every ``P``-th of those rows starting at ``r`` - the same rows the
reference's strided distributed sampler gives rank ``r`` - unless given ``row_positions``: the trainer passes the
rows its devices hold in the mesh, so the global batch is the same for 1 or N processes. Each step is zero-padded on
the right to the smallest
bucket length that holds the longest sequence of the whole global step, so all processes agree on the
shape and a jitted step compiles at most ``len(buckets)`` times. The iterator state is the next step index,
which does not depend on the process count.

Packing (``packing=True``, config ``data.packing``): before sampling, the conversations are packed into rows of
at most ``max_length`` tokens by best-fit decreasing (:func:`pack_rows`, deterministic, once per run), and the
sampler, buckets and batch sizes above then count packed rows instead of conversations. A packed row carries
``segment_ids`` (1, 2, ... per conversation, 0 on padding) and ``positions`` (restarting at 0 per conversation),
which the train step uses to keep attention, labels and anchors within a conversation. Which conversations
share a row is fixed for the run; each epoch shuffles the rows.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

__all__ = [
    "ChatFormat",
    "QWEN",
    "GEMMA4",
    "CHAT_FORMATS",
    "get_chat_format",
    "DataError",
    "normalize_messages",
    "parse_conversation",
    "span_loss_mask",
    "template_has_generation_mask",
    "ReadStats",
    "iter_jsonl",
    "read_jsonl",
    "bucket_lengths",
    "pack_rows",
    "PackedRows",
    "EpochSampler",
    "InputPipeline",
    "PipelineIterator",
]

ROLES = frozenset({"system", "user", "assistant", "tool"})


# ----------------------------------------------------------------------------------------------------------
# Chat formats
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """What the parser needs to know about a chat template.

    Attributes:
      name: registry name (``"qwen"``, ``"gemma4"``, ``"deepseek"``).
      assistant_header: rendered text that opens an assistant turn; excluded from the loss span.
      end_of_turn: rendered text that closes a turn; the loss span ends after it (included).
      default_system_prompt: system message prepended when a conversation has none (``None``: nothing).
      span_skip_prefixes: text the template writes right after ``assistant_header`` that is *not* supervised
        (Gemma4's empty thought channel); if one of them follows the header, the span starts after it.
    """

    name: str
    assistant_header: str
    end_of_turn: str
    default_system_prompt: str | None = None
    span_skip_prefixes: tuple[str, ...] = ()

    @functools.cached_property
    def span_regex(self) -> re.Pattern[str]:
        skip = ""
        if self.span_skip_prefixes:
            skip = "(?:" + "|".join(re.escape(p) for p in self.span_skip_prefixes) + ")?"
        # header [skip] (shortest text) then end_of_turn or the end of the string; group 1 = supervised text.
        return re.compile(re.escape(self.assistant_header) + skip + r"(.*?(?:" + re.escape(self.end_of_turn)
                          + r"|\Z))", re.DOTALL)

    def assistant_char_spans(self, text: str) -> list[tuple[int, int]]:
        """Character ``[start, end)`` of each supervised span in the rendered ``text``."""
        return [(m.start(1), m.end(1)) for m in self.span_regex.finditer(text) if m.end(1) > m.start(1)]


QWEN = ChatFormat(
    name="qwen",
    assistant_header="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>\n",
    default_system_prompt="You are a helpful assistant.",
)

GEMMA4 = ChatFormat(
    name="gemma4",
    assistant_header="<|turn>model\n",
    end_of_turn="<turn|>\n",
    default_system_prompt=None,
    span_skip_prefixes=("<|channel>thought\n<channel|>",),
)

# DeepSeek-V3 / V3.1 / R1: "<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>"; V3.1's non-thinking turns open
# with "</think>", which the template writes, not the model
DEEPSEEK = ChatFormat(
    name="deepseek",
    assistant_header="<｜Assistant｜>",
    end_of_turn="<｜end▁of▁sentence｜>",
    default_system_prompt=None,
    span_skip_prefixes=("</think>",),
)

CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (QWEN, GEMMA4, DEEPSEEK)}


def get_chat_format(fmt: ChatFormat | str) -> ChatFormat:
    if isinstance(fmt, ChatFormat):
        return fmt
    try:
        return CHAT_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown chat format {fmt!r}; known: {sorted(CHAT_FORMATS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Parsing one record
# ----------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A malformed training record. ``str()`` starts with ``path:line:`` when the location is known."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, line: int | None = None):
        self.reason = message
        self.path = None if path is None else os.fspath(path)
        self.line = line
        loc = "" if self.path is None else (f"{self.path}:{line}: " if line is not None else f"{self.path}: ")
        super().__init__(loc + message)

    def located(self, path: str | os.PathLike, line: int) -> DataError:
        return DataError(self.reason, path=path, line=line)


def normalize_messages(record: Any, fmt: ChatFormat | str) -> list[dict[str, Any]]:
    """Validates a record and returns the message list to render (a copy; the record is not modified).

    Accepts ``{"conversations": [...]}`` (the DeepSpec format; ``"messages"`` is accepted as an alias).
    """
    fmt = get_chat_format(fmt)
    if not isinstance(record, Mapping):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    conv = record.get("conversations", record.get("messages"))
    if conv is None:
        raise DataError("record has no 'conversations' list")
    if not isinstance(conv, list) or not conv:
        raise DataError("'conversations' must be a non-empty list")
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, Mapping):
            raise DataError(f"message {i} must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {sorted(ROLES)})")
        msg = dict(msg)
        content = msg.get("content")
        tool_calls = msg.get("tool_calls")
        if isinstance(tool_calls, str):
            try:
                tool_calls = json.loads(tool_calls)
            except json.JSONDecodeError as e:
                raise DataError(f"message {i}: tool_calls is not valid JSON ({e})") from None
            msg["tool_calls"] = tool_calls
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise DataError(f"message {i}: tool_calls must be a list, got {type(tool_calls).__name__}")
        if content is None:
            if not (role == "assistant" and tool_calls):
                raise DataError(f"message {i} ({role}) has no content")
        elif not isinstance(content, str):
            raise DataError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        messages.append(msg)
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None:
        raise DataError("conversation has only system messages")
    if first["role"] != "user":
        raise DataError(f"first non-system turn must be 'user', got {first['role']!r}")
    if messages[0]["role"] != "system" and fmt.default_system_prompt is not None:
        messages.insert(0, {"role": "system", "content": fmt.default_system_prompt})
    return messages


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_has_generation_mask(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}``."""
    try:
        template = tokenizer.get_chat_template()
    except Exception:  # no template at all: rendering will fail later with a clearer message
        return False
    return bool(_GENERATION_TAG.search(template))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def span_loss_mask(text: str, tokenizer, fmt: ChatFormat | str) -> tuple[list[int], np.ndarray]:
    """Tokenizes ``text`` and builds the span-rule loss mask (spec §3.1 step 5). Returns (ids, uint8 mask)."""
    fmt = get_chat_format(fmt)
    spans = fmt.assistant_char_spans(text)
    pieces = [text] + [p for s, e in spans for p in (text[:s], text[:e])]
    encoded = _encode(tokenizer, pieces)
    ids = encoded[0]
    mask = np.zeros(len(ids), np.uint8)
    for k in range(len(spans)):
        start, end = len(encoded[1 + 2 * k]), len(encoded[2 + 2 * k])
        mask[start:end] = 1
    return ids, mask


def _render(tokenizer, messages, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    except Exception as e:  # jinja errors (e.g. raise_exception in the template), bad tool_calls, ...
        raise DataError(f"chat template failed: {type(e).__name__}: {e}") from None


def parse_conversation(
    record: Any,
    tokenizer,
    fmt: ChatFormat | str,
    max_length: int,
    *,
    mask_source: Literal["auto", "span", "template"] = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """One JSONL record -> (input_ids ``int32[S]``, loss_mask ``uint8[S]``), ``S <= max_length``.

    ``mask_source``: ``"span"`` always applies the spec's span rule; ``"template"`` requires the chat template's
    ``{% generation %}`` mask; ``"auto"`` uses the template mask when the template has one, else the span rule.
    Raises :class:`DataError` for a malformed record.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids, mask = _parse_untruncated(record, tokenizer, get_chat_format(fmt), mask_source)
    return np.asarray(ids[:max_length], np.int32), mask[:max_length].copy()


def _parse_untruncated(record, tokenizer, fmt: ChatFormat, mask_source: str) -> tuple[list[int], np.ndarray]:
    if mask_source not in ("auto", "span", "template"):
        raise ValueError(f"mask_source must be 'auto', 'span' or 'template', got {mask_source!r}")
    messages = normalize_messages(record, fmt)
    has_generation = template_has_generation_mask(tokenizer)
    if mask_source == "template" and not has_generation:
        raise ValueError("mask_source='template' but the chat template has no {% generation %} block")
    if mask_source != "span" and has_generation:
        enc = _render(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), np.asarray(enc["assistant_masks"], np.uint8)
    text = _render(tokenizer, messages, tokenize=False)
    return span_loss_mask(text, tokenizer, fmt)


# ----------------------------------------------------------------------------------------------------------
# JSONL reader
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReadStats:
    """Counts from :func:`read_jsonl`. ``read`` = non-blank lines seen; ``kept + dropped_* + bad == read``."""

    read: int = 0
    kept: int = 0
    dropped_short: int = 0  # fewer than min_loss_tokens supervised tokens (after truncation)
    dropped_status: int = 0  # "status" present and not "success" (failed generations)
    bad: int = 0  # malformed lines (only nonzero with skip_bad_lines)
    truncated: int = 0  # kept samples cut at max_length
    truncated_tokens: int = 0  # tokens cut away, over all parsed records
    rejects_path: str | None = None  # side file the bad lines went to, if any


def _as_paths(path) -> list[str]:
    if isinstance(path, (str, os.PathLike)):
        return [os.fspath(path)]
    return [os.fspath(p) for p in path]


def iter_jsonl(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    fmt: ChatFormat | str,
    max_length: int,
    *,
    min_loss_tokens: int = 14,
    skip_bad_lines: bool = False,
    rejects_path: str | os.PathLike | None = None,
    stats: ReadStats | None = None,
    mask_source: Literal["auto", "span", "template"] = "auto",
) -> Iterator[dict[str, np.ndarray]]:
    """Streams parsed samples ``{"input_ids", "loss_mask"}`` from one or more JSONL files (in the given order).

    ``stats`` (if given) is updated in place. See :func:`read_jsonl` for the error handling.
    """
    fmt = get_chat_format(fmt)
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    paths = _as_paths(path)
    stats = ReadStats() if stats is None else stats
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"training data file not found: {p}")
    if skip_bad_lines and rejects_path is None:
        rejects_path = paths[0] + ".rejects.jsonl"
    rejects = None
    try:
        for p in paths:
            with open(p, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    stats.read += 1
                    try:
                        try:
                            record = json.loads(raw.decode("utf-8"))
                        except UnicodeDecodeError as e:
                            raise DataError(f"line is not valid UTF-8 ({e})") from None
                        except json.JSONDecodeError as e:
                            raise DataError(f"invalid JSON ({e})") from None
                        if isinstance(record, Mapping) and record.get("status", "success") != "success":
                            stats.dropped_status += 1
                            continue
                        ids, mask = _parse_untruncated(record, tokenizer, fmt, mask_source)
                    except DataError as e:
                        err = e.located(p, lineno)
                        if not skip_bad_lines:
                            raise err from None
                        stats.bad += 1
                        if rejects is None:
                            rejects = open(rejects_path, "w", encoding="utf-8")
                            stats.rejects_path = os.fspath(rejects_path)
                        rejects.write(json.dumps({"path": p, "line": lineno, "reason": err.reason,
                                                  "raw": raw.decode("utf-8", errors="replace").rstrip("\r\n")},
                                                 ensure_ascii=False) + "\n")
                        rejects.flush()
                        continue
                    stats.truncated_tokens += max(0, len(ids) - max_length)
                    cut = len(ids) > max_length
                    ids, mask = np.asarray(ids[:max_length], np.int32), mask[:max_length].copy()
                    if int(mask.sum()) < min_loss_tokens:
                        stats.dropped_short += 1
                        continue
                    stats.kept += 1
                    stats.truncated += int(cut)
                    yield {"input_ids": ids, "loss_mask": mask}
    finally:
        if rejects is not None:
            rejects.close()


def read_jsonl(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    fmt: ChatFormat | str,
    max_length: int,
    min_loss_tokens: int = 14,
    skip_bad_lines: bool = False,
    rejects_path: str | os.PathLike | None = None,
    *,
    mask_source: Literal["auto", "span", "template"] = "auto",
) -> tuple[list[dict[str, np.ndarray]], ReadStats]:
    """Reads and parses JSONL conversations. Returns (samples, stats).

    Blank lines are skipped. Samples with fewer than ``min_loss_tokens`` supervised tokens are dropped and
    counted. By default the first malformed line raises ``DataError("path:line: reason")``; with
    ``skip_bad_lines`` malformed lines are counted and written (path, line, reason, raw text; one JSON object
    a line) to ``rejects_path`` (default ``<first path>.rejects.jsonl``, created only if a line is rejected).
    A missing file raises ``FileNotFoundError`` before anything is read.
    """
    stats = ReadStats()
    samples = list(iter_jsonl(path, tokenizer, fmt, max_length, min_loss_tokens=min_loss_tokens,
                              skip_bad_lines=skip_bad_lines, rejects_path=rejects_path, stats=stats,
                              mask_source=mask_source))
    return samples, stats


# ----------------------------------------------------------------------------------------------------------
# Sampler, bucketing, pipeline
# ----------------------------------------------------------------------------------------------------------


def bucket_lengths(max_length: int, min_bucket: int = 128) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` below ``max_length``, then ``max_length`` itself."""
    if max_length <= 0 or min_bucket <= 0:
        raise ValueError("max_length and min_bucket must be positive")
    out, b = [], 1 << max(0, (min_bucket - 1).bit_length())
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def pack_rows(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing bin packing of sequences into rows of ``capacity`` tokens.

    Sequences are placed longest first (ties: lower index first), each into the open row with the least room
    that still fits it (ties: the older row), else into a new row. Deterministic. Returns one ``int64`` array of
    sequence indices per row, ascending within a row (the order the row lays them out), rows in creation order.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"sequence lengths must lie in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []        # (free tokens, row id), ascending: best fit = first that fits
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return [np.asarray(sorted(r), np.int64) for r in rows]


class PackedRows(Sequence):
    """Random access to packed rows: row ``r`` concatenates the samples ``plan[r]`` (every per-token array,
    cached target features included) and adds ``segment_ids`` int32 (1..k) and ``positions`` int32 (restarting
    at 0 per sample). ``lengths``: tokens per row."""

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]], plan: Sequence[np.ndarray],
                 sample_lengths: np.ndarray):
        self.samples, self.plan = samples, list(plan)
        self.sample_lengths = np.asarray(sample_lengths, np.int64)
        self.lengths = np.asarray([int(self.sample_lengths[p].sum()) for p in self.plan], np.int64)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, r):
        items = [self.samples[int(i)] for i in self.plan[r]]
        lens = [int(self.sample_lengths[int(i)]) for i in self.plan[r]]
        out = {}
        for key in items[0]:
            arrays = [np.asarray(it[key]) for it in items]
            if not all(a.ndim >= 1 and a.shape[0] == n for a, n in zip(arrays, lens)):
                raise ValueError(f"packing concatenates per-token arrays; {key!r} is not one")
            out[key] = np.concatenate(arrays, axis=0)
        out["segment_ids"] = np.repeat(np.arange(1, len(lens) + 1, dtype=np.int32), lens)
        out["positions"] = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        return out


class EpochSampler:
    """Index logic of spec §3.5 (pure, world-size independent).

    Epoch ``e``'s order is ``permutation(num_samples)`` from ``np.random.default_rng(seed + e)``, cut to
    ``samples_per_epoch = G*floor(N/G)``. Step ``k`` (global, counting across epochs) covers
    ``order[j*M:(j+1)*M]`` with ``e, j = divmod(k, steps_per_epoch)``; process ``r`` of ``P`` takes
    ``rows[r::P]``.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int | None = None,
                 seed: int = 42):
        m = global_batch_size if micro_batch_size is None else micro_batch_size
        if global_batch_size <= 0 or m <= 0 or global_batch_size % m:
            raise ValueError(f"micro_batch_size ({m}) must divide global_batch_size ({global_batch_size})")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(m)
        self.seed = int(seed)
        self.samples_per_epoch = (self.num_samples // self.global_batch_size) * self.global_batch_size
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of {self.global_batch_size}")
        self.steps_per_epoch = self.samples_per_epoch // self.micro_batch_size
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices of epoch ``epoch`` in visiting order, ``int64[samples_per_epoch]`` (read-only)."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
                order = order[: self.samples_per_epoch]
                order.flags.writeable = False
                if len(self._orders) >= 2:  # steps move forward: keep the current and the next epoch
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = order
            return order

    def global_rows(self, step: int) -> np.ndarray:
        epoch, j = divmod(int(step), self.steps_per_epoch)
        return self.epoch_order(epoch)[j * self.micro_batch_size:(j + 1) * self.micro_batch_size]

    def local_rows(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        return self.global_rows(step)[process_index::process_count]

    def fingerprint(self) -> dict[str, int]:
        return {"num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size, "seed": self.seed}


def _default_process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class InputPipeline:
    """Shuffled, process-sharded, length-bucketed batches over a random-access sample source.

    Args:
      samples: a sequence of mappings ``{"input_ids": int[S], "loss_mask": uint8[S], ...}``; every array
        whose first axis is ``S`` is right-padded with zeros, other arrays are stacked as they are.
      global_batch_size: sequences per optimizer step over all processes (the drop-remainder unit, ``G``).
      micro_batch_size: sequences per yielded step over all processes (``M``, divides ``G``; default ``G``).
        Each process gets ``M // process_count`` rows.
      max_length: longest allowed sequence; the last bucket.
      buckets: allowed padded lengths (ascending, last ``>= max_length``); default :func:`bucket_lengths`.
      seed: base seed, epoch ``e`` uses ``seed + e``.
      num_epochs: ``None`` streams forever.
      process_index / process_count: this process's shard; default ``jax.process_index()/process_count()``.
      row_positions: the positions in each global micro batch this process loads, in order (default: every
        ``process_count``-th from ``process_index``). A trainer on a mesh passes the rows its devices hold
        (:func:`~dspark_jax.train.step.process_batch_rows`), which makes the global batch independent of the
        number of processes.
      lengths: optional ``int[N]`` sequence lengths (saves reading every sample up front).
      num_threads / prefetch: grain read threads and prefetch buffer (``num_threads=0``: no grain, no threads).
      packing: pack the samples into rows of ``max_length`` first (:func:`pack_rows`); the batch sizes, the
        sampler and ``len(pipeline.samples)`` then count packed rows.

    Batches: ``{"input_ids": int32[B, L], "loss_mask": uint8[B, L], "lengths": int32[B], ...}`` with
    ``B = len(row_positions)`` (default ``M // process_count``) and ``L`` in ``buckets`` (+ ``segment_ids``,
    ``positions`` int32[B, L] when packing; 0 on padding).
    """

    def __init__(
        self,
        samples: Sequence[Mapping[str, np.ndarray]],
        *,
        global_batch_size: int,
        max_length: int,
        micro_batch_size: int | None = None,
        buckets: Sequence[int] | None = None,
        seed: int = 42,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        row_positions: Sequence[int] | np.ndarray | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
        num_threads: int = 2,
        prefetch: int = 4,
        packing: bool = False,
    ):
        self.packing = bool(packing)
        if self.packing:
            if lengths is None:
                lengths = [len(s["input_ids"]) for s in samples]
            samples = PackedRows(samples, pack_rows(lengths, int(max_length)), np.asarray(lengths, np.int64))
            lengths = samples.lengths
        self.samples = samples
        self.sampler = EpochSampler(len(samples), global_batch_size, micro_batch_size, seed)
        if process_index is None or process_count is None:
            pi, pc = _default_process()
            process_index = pi if process_index is None else process_index
            process_count = pc if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
        if self.sampler.micro_batch_size % process_count:
            raise ValueError(f"micro batch {self.sampler.micro_batch_size} is not divisible by "
                             f"{process_count} processes")
        self.process_index, self.process_count = int(process_index), int(process_count)
        if row_positions is None:
            row_positions = np.arange(self.sampler.micro_batch_size)[self.process_index::self.process_count]
        self.row_positions = np.asarray(row_positions, np.int64)
        m = self.sampler.micro_batch_size
        if (self.row_positions.ndim != 1 or not len(self.row_positions) or self.row_positions.min() < 0
                or self.row_positions.max() >= m or len(set(self.row_positions.tolist())) != len(self.row_positions)):
            raise ValueError(f"row_positions must be distinct positions in [0, {m}), got {self.row_positions}")
        self.local_batch_size = len(self.row_positions)
        self.max_length = int(max_length)
        self.buckets = tuple(int(b) for b in (bucket_lengths(max_length) if buckets is None else buckets))
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] < self.max_length:
            raise ValueError(f"buckets must be strictly ascending and end at >= max_length: {self.buckets}")
        if lengths is None:
            lengths = [len(s["input_ids"]) for s in samples]
        self.lengths = np.asarray(lengths, np.int64)
        if self.lengths.shape != (len(samples),):
            raise ValueError(f"lengths has shape {self.lengths.shape}, expected ({len(samples)},)")
        if len(self.lengths) and (self.lengths.max() > self.max_length or self.lengths.min() < 1):
            raise ValueError(f"sample lengths must lie in [1, max_length={self.max_length}], "
                             f"got [{self.lengths.min()}, {self.lengths.max()}]")
        self.num_epochs = num_epochs
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)

    # -- random access ------------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __len__(self) -> int:
        """Number of steps (``sys.maxsize`` when streaming forever)."""
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def bucket_for(self, length: int) -> int:
        return self.buckets[int(np.searchsorted(self.buckets, length))]

    def global_tokens(self, step: int) -> int:
        """Unpadded tokens in global step ``step`` over all processes (for throughput figures)."""
        return int(self.lengths[self.sampler.global_rows(step)].sum())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step ``step``."""
        if not 0 <= step < len(self):
            raise IndexError(step)
        rows = self.sampler.global_rows(step)
        width = self.bucket_for(int(self.lengths[rows].max()))
        local = rows[self.row_positions]
        return _collate([self.samples[int(i)] for i in local], self.lengths[local], width)

    # -- iteration ----------------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, int]:
        """What a saved iterator state must match (the sampler's, plus the packing capacity when packing)."""
        extra = {"packed_length": self.max_length} if self.packing else {}
        return {**self.sampler.fingerprint(), **extra}

    def padding_fraction(self, steps: Sequence[int] | None = None) -> float:
        """Padding tokens / all tokens of the global batches ``steps`` (default: the first epoch)."""
        steps = range(self.steps_per_epoch) if steps is None else steps
        real = padded = 0
        for k in steps:
            rows = self.sampler.global_rows(k)
            real += int(self.lengths[rows].sum())
            padded += len(rows) * self.bucket_for(int(self.lengths[rows].max()))
        return 1.0 - real / max(padded, 1)

    def state_at(self, step: int) -> dict[str, Any]:
        """The iterator state that resumes at global step ``step``."""
        return {"step": int(step), **self.fingerprint()}

    def iterator(self, state: Mapping[str, Any] | None = None) -> PipelineIterator:
        it = PipelineIterator(self)
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self) -> PipelineIterator:
        return self.iterator()


def _collate(items: list[Mapping[str, np.ndarray]], lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in items[0]:
        arrays = [np.asarray(it[key]) for it in items]
        if key == "input_ids":
            arrays = [a.astype(np.int32, copy=False) for a in arrays]
        elif key == "loss_mask":
            arrays = [a.astype(np.uint8, copy=False) for a in arrays]
        per_token = all(a.ndim >= 1 and a.shape[0] == n for a, n in zip(arrays, lengths))
        if per_token:
            buf = np.zeros((len(arrays), width) + arrays[0].shape[1:], arrays[0].dtype)
            for r, a in enumerate(arrays):
                buf[r, : a.shape[0]] = a
            out[key] = buf
        else:
            out[key] = np.stack(arrays)
    out["lengths"] = lengths.astype(np.int32)
    return out


def _grain_dataset(pipeline: InputPipeline):
    """``pipeline`` as a grain ``MapDataset`` of batches, or ``None`` without grain."""
    try:
        import grain
    except ImportError:  # pragma: no cover - grain is optional; the plain iterator has the same semantics
        return None

    class _Batches(grain.MapDataset):
        def __init__(self):
            super().__init__()

        def __len__(self):
            return len(pipeline)

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            return pipeline.batch(index)

        def __str__(self):
            return f"DSparkBatches(steps_per_epoch={pipeline.steps_per_epoch})"

    return _Batches()


class PipelineIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over :class:`InputPipeline` batches with ``get_state()`` / ``set_state()``.

    The state is a small JSON-able dict (``{"step": k, ...fingerprint}``): restoring it yields exactly the
    batches that followed when it was taken. With ``num_threads > 0`` and grain installed, batches are built
    ahead by grain's prefetching iterator; without, they are built on demand.
    """

    def __init__(self, pipeline: InputPipeline):
        self.pipeline = pipeline
        self._step = 0
        self._inner = None
        self._dataset = _grain_dataset(pipeline) if pipeline.num_threads > 0 else None
        self._start_inner()

    def _start_inner(self):
        if self._dataset is None:
            return
        import grain

        opts = grain.ReadOptions(num_threads=self.pipeline.num_threads, prefetch_buffer_size=self.pipeline.prefetch)
        self._inner = iter(self._dataset.to_iter_dataset(opts))
        if self._step:
            self._inner.set_state({"next_index": self._step})

    @property
    def uses_grain(self) -> bool:
        return self._inner is not None

    @property
    def step(self) -> int:
        """Global step index of the next batch."""
        return self._step

    def __next__(self) -> dict[str, np.ndarray]:
        if self._step >= len(self.pipeline):
            raise StopIteration
        batch = next(self._inner) if self._inner is not None else self.pipeline.batch(self._step)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.pipeline.state_at(self._step)

    def set_state(self, state: Mapping[str, Any]) -> None:
        expected = self.pipeline.fingerprint()
        got = {k: state.get(k) for k in expected}
        if "packed_length" in state and "packed_length" not in expected:
            got["packed_length"] = state["packed_length"]      # a packed run's state does not resume unpacked
        if got != expected:
            raise ValueError(f"iterator state was taken with a different data set-up: {got} != {expected}")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"bad step {step}")
        self._step = step
        if self._inner is not None:
            self._inner.set_state({"next_index": step})

    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._step // self.pipeline.steps_per_epoch

