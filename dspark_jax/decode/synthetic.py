"""Training-data regeneration with the target (spec §3.1): every assistant turn is rewritten by the target.

DeepSpec does this through an OpenAI-compatible server (``scripts/data/generate_train_data.py``); here the
target (and, optionally, a draft for speculative decoding, which is lossless) runs in-process, batched across
conversations. Per conversation, messages are walked in order as DeepSpec does: system messages are kept,
input assistant messages are dropped, and after each user message the history is rendered with the chat
template (generation prompt, ``enable_thinking=False``) and the target generates the assistant turn, which
is appended before the next user turn. Turns are requests to a slot engine (continuous batching,
decode/slots.py): a finished turn's slot takes the next request at once, a conversation's next turn is
submitted as soon as its previous one is done, and a conversation's record is written as soon as it is done.
Each turn samples with a key of the seed, the conversation id and the turn index, so records do not depend on
the batching, the number of processes or a resume.

The output is JSONL in the training format ``{"id", "conversations", "status": "success"}`` (other input keys
are kept), in input order. It is resumable and crash-safe: each finished record is one ``write`` + ``flush`` of a
whole line (to a shard, folded into the output at the end); on start, shards left behind are folded in, ids
already in the output are skipped and a trailing partial line (a crash mid-write) is cut away.
A conversation that fails is written as ``{"id", ..., "status": "error", "error": "..."}`` and the run goes
on (the training reader drops non-success records). Input records without an id get a stable one: a hash
of their content.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dspark_jax import distributed
from dspark_jax.config import next_bucket
from dspark_jax.convert.deepspec import load_draft
from dspark_jax.convert.hf import load_target
from dspark_jax.decode.autoregressive import slot_engine
from dspark_jax.decode.compile_timer import CompileTimer
from dspark_jax.decode.jsonl_shards import fold_shards, shard_path
from dspark_jax.decode.speculative import spec_slot_engine

ROLES = ("system", "user", "assistant")


# ---- chat rendering and stop tokens (shared with dspark_jax.eval) -----------------------------------------

def render_chat(tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                enable_thinking: bool = False) -> list[int]:
    """Messages -> prompt token ids via the tokenizer's chat template (no special tokens added on top).

    ``enable_thinking`` is passed as a template kwarg (Qwen3 writes an empty think block when it is False).
    """
    if tokenizer is None:
        raise ValueError("the target has no tokenizer: put the tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, ...) in the target directory")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                         "or chat_template.jinja)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def resolve_stop_ids(target, target_dir: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Stop tokens: the config's eos ids, ``generation_config.json``'s eos ids (when ``target_dir`` has one), the
    tokenizer's eos token and ``<|im_end|>`` when the vocabulary has it; ids outside the vocab are dropped."""
    ids = list(target.config.eos_token_ids)
    if target_dir is not None:
        gen = os.path.join(os.fspath(target_dir), "generation_config.json")
        if os.path.isfile(gen):
            with open(gen, encoding="utf-8") as f:
                ids += _as_ids(json.load(f).get("eos_token_id"))
    tok = getattr(target, "tokenizer", None)
    if tok is not None:
        ids += _as_ids(getattr(tok, "eos_token_id", None))
        vocab = tok.get_vocab()
        if "<|im_end|>" in vocab:
            ids.append(int(vocab["<|im_end|>"]))
    v = target.config.vocab_size
    return tuple(dict.fromkeys(i for i in ids if 0 <= i < v))


def stable_id(record: Any) -> str:
    """A content hash (sha256 of the canonical JSON, 16 hex chars): the same record always gets the same id."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---- the output file: scan for resume, append whole lines -------------------------------------------------

@dataclasses.dataclass
class OutputScan:
    done_ids: set[str]
    success: int = 0
    errors: int = 0
    truncated_bytes: int = 0   # a partial last line that was cut away
    bad_lines: int = 0         # complete lines that are not JSON objects with an id (left in place, ignored)


def scan_output(path: str | os.PathLike, *, repair: bool = True) -> OutputScan:
    """Ids already written to ``path``; with ``repair`` a trailing partial line (no final newline) is truncated."""
    path = os.fspath(path)
    scan = OutputScan(done_ids=set())
    if not os.path.exists(path):
        return scan
    good_end = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                scan.truncated_bytes = len(raw)
                break
            good_end += len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                rid = rec["id"]
            except (ValueError, KeyError, TypeError):
                scan.bad_lines += 1
                continue
            scan.done_ids.add(str(rid))
            if rec.get("status") == "success":
                scan.success += 1
            else:
                scan.errors += 1
    if scan.truncated_bytes and repair:
        os.truncate(path, good_end)
    return scan


class RecordWriter:
    """Appends one JSON record per line; each record is a single write followed by a flush."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._f = open(self.path, "ab")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_writable(path: str | os.PathLike) -> None:
    """Raises ``OSError`` with a clear message when ``path`` cannot be created / appended to."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OSError(f"output path {path!r} is a directory, not a .jsonl file")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise OSError(f"output path {path!r} is not writable: {e.strerror or e}") from None


# ---- input records ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Conversation:
    """One input record being regenerated: ``source`` = its messages, ``history`` = the regenerated ones."""

    id: str
    record: dict[str, Any]
    source: list[dict[str, Any]]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pos: int = 0
    error: str | None = None
    new_tokens: list[int] = dataclasses.field(default_factory=list)
    finish: list[str] = dataclasses.field(default_factory=list)

    def next_user_turn(self) -> bool:
        """Advances past system (kept) and input assistant (dropped) messages to the next user message,
        which is appended to the history. False when the conversation is finished."""
        while self.pos < len(self.source):
            msg = self.source[self.pos]
            self.pos += 1
            if msg["role"] == "system":
                self.history.append(msg)
            elif msg["role"] == "user":
                self.history.append(msg)
                return True
        return False

    def result(self) -> dict[str, Any]:
        rec = {"id": self.id, **{k: v for k, v in self.record.items() if k not in ("id", "status", "error")}}
        if self.error is not None:
            rec.update(status="error", error=self.error)
            return rec
        rec.pop("turns", None)
        rec.pop("messages", None)
        rec["conversations"] = self.history
        rec["status"] = "success"
        rec["generation"] = {"new_tokens": self.new_tokens, "finish_reason": self.finish}
        return rec


def source_messages(record: Any) -> list[dict[str, Any]]:
    """Validates an input record and returns its messages (``conversations`` / ``messages``, or ``turns`` =
    user turns). Raises ``ValueError`` with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    conv = record.get("conversations", record.get("messages"))
    if conv is None and isinstance(record.get("turns"), list):
        conv = [{"role": "user", "content": t} for t in record["turns"]]
    if not isinstance(conv, list) or not conv:
        raise ValueError("missing conversations (expected a non-empty 'conversations' list or 'turns')")
    out = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has invalid role {role!r} (expected one of {list(ROLES)})")
        if role != "assistant" and not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} ({role}) needs string content")
        out.append(dict(msg))
    first = next(m for m in out if m["role"] != "system") if any(m["role"] != "system" for m in out) else None
    if first is None or first["role"] != "user":
        raise ValueError("data starts with an assistant message" if first is not None else "no user message")
    return out


def read_conversations(path: str | os.PathLike) -> tuple[list[Conversation], int]:
    """All records of the input JSONL (an unparsable line becomes an errored conversation). Returns
    (conversations with unique ids in input order, number of duplicate ids dropped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    convs: list[Conversation] = []
    seen: set[str] = set()
    dups = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                conv = Conversation(stable_id(text), {"raw": text}, [], error=f"line {lineno}: invalid JSON ({e})")
            else:
                rid = record.get("id") if isinstance(record, dict) else None
                rid = str(rid) if rid is not None else stable_id(record)
                try:
                    conv = Conversation(rid, record, source_messages(record))
                except ValueError as e:
                    conv = Conversation(rid, record if isinstance(record, dict) else {"raw": record}, [],
                                        error=str(e))
            if conv.id in seen:
                dups += 1
                continue
            seen.add(conv.id)
            convs.append(conv)
    return convs, dups


# ---- generation ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenSettings:
    """``batch_size``: the number of slots (requests decoding at once); ``refill_at``: the engine hands back to
    refill once this many slots are free (None: its default, ``max(1, batch_size // 8)``)."""

    max_new_tokens: int = 4096
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    threshold: float = 0.0
    seed: int = 0
    batch_size: int = 8
    max_prompt_tokens: int | None = None
    refill_at: int | None = None


@dataclasses.dataclass
class RunReport:
    total: int = 0
    skipped: int = 0
    duplicates: int = 0
    success: int = 0
    errors: int = 0
    new_tokens: int = 0
    seconds: float = 0.0           # wall time of generation (host work between decode calls included)
    compile_seconds: float = 0.0   # of which tracing and compiling (JAX's compile events)
    truncated_bytes: int = 0
    bad_lines: int = 0
    engines: int = 0               # slot engines built (one per prompt-length bucket reached)
    slot_utilisation: float = 0.0  # busy / all slot-steps over the engines

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Throughput without compilation: tokens over the generation time less the compile time."""
        steady = self.seconds - self.compile_seconds
        return self.new_tokens / steady if self.new_tokens and steady > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s,
                "steady_tokens_per_s": self.steady_tokens_per_s}


def request_id(conversation_id: str, turn: int) -> int:
    """The sampling id of a conversation's ``turn``-th assistant turn: a hash into ``[0, 2**31)`` of the
    conversation id and the turn index alone, so (with the seed) a record is the same whatever the batching, the
    process count or a resume."""
    digest = hashlib.sha256(f"{conversation_id}\x00{turn}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _decode(tokenizer, ids: list[int], stop_ids: tuple[int, ...]) -> tuple[str, str]:
    finish = "length"
    if ids and ids[-1] in stop_ids:
        ids, finish = ids[:-1], "stop"
    return tokenizer.decode(ids, skip_special_tokens=True), finish


def prompt_limit(target, settings: GenSettings) -> int:
    """The longest rendered history a turn may have: ``max_prompt_tokens`` or the positions left for it."""
    if settings.max_prompt_tokens is not None:
        return settings.max_prompt_tokens
    return target.config.max_position_embeddings - settings.max_new_tokens


def next_request(c: Conversation, tokenizer, limit: int, vocab_size: int) -> list[int] | None:
    """The prompt of ``c``'s next assistant turn (its history rendered with the chat template), or None when the
    conversation is finished or failed (``c.error`` set: template error, over-long prompt, ids outside the
    vocab)."""
    if c.error is not None or not c.next_user_turn():
        return None
    turn = len(c.new_tokens)
    try:
        ids = render_chat(tokenizer, c.history)
    except Exception as e:  # jinja errors, template raise_exception, ...
        c.error = f"turn {turn}: chat template failed: {type(e).__name__}: {e}"
        return None
    if len(ids) > limit:
        c.error = (f"turn {turn}: prompt has {len(ids)} tokens, over the limit of {limit} "
                   f"(max_position_embeddings - max_new_tokens, or --max-prompt-tokens)")
        return None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        c.error = f"turn {turn}: prompt has token id(s) {bad[:5]} outside the target's vocab [0, {vocab_size})"
        return None
    return ids


def add_turn(c: Conversation, tokens, tokenizer, stop_ids: tuple[int, ...]) -> None:
    """Appends a generated assistant turn (new token ids, a final stop token included) to ``c``."""
    ids = [int(t) for t in tokens]
    text, finish = _decode(tokenizer, ids, stop_ids)
    c.history.append({"role": "assistant", "content": text})
    c.new_tokens.append(len(ids))
    c.finish.append(finish)


def engine_factory(target, draft, settings: GenSettings, stop_ids: tuple[int, ...]):
    """``make(max_prompt_len, num_slots) -> SlotEngine``: plain, or speculative with ``draft``."""
    kw = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
              top_p=settings.top_p, stop_token_ids=stop_ids, seed=settings.seed)

    def make(max_prompt_len: int, num_slots: int):
        refill_at = None if settings.refill_at is None else min(settings.refill_at, num_slots)
        if draft is None:
            return slot_engine(target, num_slots=num_slots, max_prompt_len=max_prompt_len, refill_at=refill_at, **kw)
        return spec_slot_engine(target, draft, num_slots=num_slots, max_prompt_len=max_prompt_len,
                                threshold=settings.threshold, refill_at=refill_at, **kw)

    return make


def regenerate(convs: list[Conversation], make_engine, tokenizer, *, num_slots: int, limit: int, vocab_size: int,
               stop_ids: tuple[int, ...], report: RunReport, on_done: Callable[[Conversation], None]) -> None:
    """Regenerates every assistant turn of ``convs`` over ``num_slots`` refilled slots, calling ``on_done(c)`` as
    soon as conversation ``c`` is finished (or failed: ``c.error``). At most ``num_slots`` conversations are in
    flight, each with one request at a time: a turn's prompt is rendered and submitted when the previous turn
    is done (while the engine runs), a new conversation starts when one ends.

    Engine size: a slot's cache holds the engine's prompt bucket + ``max_new_tokens``, for every slot, so the
    bucket is the power of two of the longest prompt seen so far rather than the prompt limit (by default
    ``max_position_embeddings - max_new_tokens``: tens of thousands of positions per slot). Prompts grow with the
    turns; one that outgrows the engine waits, no new conversation starts, and once the engine has drained it is
    rebuilt for the larger bucket (at most log2(limit) rebuilds, each one compile). A failing engine call fails
    only the requests that cannot run alone: those in flight are retried one by one on a 1-slot engine."""
    todo = collections.deque(convs)
    deferred: list[tuple[Conversation, list[int]]] = []   # prompts waiting for a larger engine
    outstanding: dict[int, tuple[Conversation, list[int]]] = {}   # submitted, not yet finished
    engine = None
    active = 0       # conversations started and not yet done
    busy_steps = slot_steps = 0

    def done(c):
        nonlocal active
        active -= 1
        on_done(c)

    def submit(c) -> None:
        """Renders ``c``'s next turn and queues it (or ends ``c``)."""
        ids = next_request(c, tokenizer, limit, vocab_size)
        if ids is None:
            done(c)
        elif engine is None or len(ids) > engine.max_prompt_len:
            deferred.append((c, ids))
        else:
            outstanding[id(c)] = (c, ids)
            engine.submit(request_id(c.id, len(c.new_tokens)), ids, tag=c)

    def start_more() -> None:
        nonlocal active
        while todo and active < num_slots and not (deferred and engine is not None and engine.busy):
            c = todo.popleft()
            active += 1
            submit(c)

    def finished(c, result) -> None:
        tokens = getattr(result, "tokens", result)     # a SpecResult, or the plain engine's token array
        outstanding.pop(id(c), None)
        report.new_tokens += len(tokens)
        add_turn(c, tokens, tokenizer, stop_ids)
        submit(c)

    def retry_alone(bucket: int) -> None:
        """After a failed engine call: each request in flight alone; a failure is its conversation's error."""
        for c, ids in list(outstanding.values()):
            outstanding.pop(id(c))
            try:
                alone = make_engine(bucket, 1)
                alone.submit(request_id(c.id, len(c.new_tokens)), ids, tag=c)
                (_, result), = list(alone.run())
            except Exception as e:
                c.error = f"turn {len(c.new_tokens)}: generation failed: {type(e).__name__}: {e}"
                done(c)
                continue
            finished(c, result)

    while True:
        start_more()
        if deferred and (engine is None or not engine.busy):
            queued = list(engine.queue) if engine is not None else []
            bucket = next_bucket(max(len(ids) for _, ids in deferred + [(None, q[1]) for q in queued]))
            if engine is not None:
                bucket = max(bucket, engine.max_prompt_len)
                busy_steps += engine.stats.busy_slot_steps
                slot_steps += engine.stats.slot_steps
            engine = make_engine(bucket, num_slots)
            report.engines += 1
            for rid, toks, c in queued:
                engine.submit(rid, toks, tag=c)
            waiting, deferred[:] = list(deferred), []
            for c, ids in waiting:
                outstanding[id(c)] = (c, ids)
                engine.submit(request_id(c.id, len(c.new_tokens)), ids, tag=c)
        if engine is None or not engine.busy:
            break
        results = engine.run(followups=True)
        while True:
            try:
                c, result = next(results)
            except StopIteration:
                break
            except Exception:   # a failed engine call (only those: errors of this loop's own code propagate)
                bucket = engine.max_prompt_len
                busy_steps += engine.stats.busy_slot_steps
                slot_steps += engine.stats.slot_steps
                engine = None   # its state is lost with the failed call: rebuilt for what comes next
                retry_alone(bucket)
                break
            finished(c, result)
            start_more()
    if engine is not None:
        busy_steps += engine.stats.busy_slot_steps
        slot_steps += engine.stats.slot_steps
    report.slot_utilisation = busy_steps / slot_steps if slot_steps else 0.0


def generate_data(target, draft, input_path: str | os.PathLike, output_path: str | os.PathLike,
                  settings: GenSettings, *, target_dir: str | os.PathLike | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, process_index: int = 0,
                  process_count: int = 1) -> RunReport:
    """Regenerates the assistant turns of ``input_path`` into ``output_path`` (resumable). Returns a report.

    Conversations run through a slot engine of ``settings.batch_size`` slots (:func:`regenerate`); each finished
    record is appended at once to this process's shard ``<output>.shard-<p>-of-<P>``
    (:mod:`~dspark_jax.decode.jsonl_shards`, also with one process), and at the end process 0 folds the shards into
    ``output_path`` in input order, so the output does not depend on the completion order. A run that stops
    early leaves its shard; the next run folds it in first and skips those ids.

    With ``process_count > 1`` (every process of a ``jax.distributed`` run calls this with its index) process
    ``p`` takes conversations ``p, p + P, ...`` of those left to do. A turn samples with its own key (the seed and
    :func:`request_id`), so records are the same for any process count. The report then counts the records and
    tokens of all processes."""
    main = process_index == 0
    if getattr(target, "tokenizer", None) is None:
        raise ValueError("the target has no tokenizer: generate-data needs the tokenizer files and chat template "
                         "in the target directory")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {settings.batch_size}")
    if settings.refill_at is not None and settings.refill_at < 1:
        raise ValueError(f"refill_at must be >= 1, got {settings.refill_at}")
    check_writable(output_path)
    convs, dups = read_conversations(input_path)
    truncated = 0
    if main:  # cut a crash's partial line, take in the shards an interrupted run left
        truncated = scan_output(output_path).truncated_bytes
        fold_shards(output_path, order=[c.id for c in convs])
    if process_count > 1:
        distributed.barrier("dspark_jax.generate_data.scanned")
    scan = scan_output(output_path, repair=False)
    report = RunReport(total=len(convs), duplicates=dups, truncated_bytes=truncated, bad_lines=scan.bad_lines)
    if truncated:
        log(f"[generate-data] {output_path}: cut a partial last line ({scan.truncated_bytes} bytes) left by an "
            "interrupted run; that record is regenerated")
    if scan.bad_lines:
        log(f"[generate-data] warning: {scan.bad_lines} line(s) of {output_path} are not records with an id; ignored")
    if dups:
        log(f"[generate-data] {dups} input record(s) repeat an earlier id; each id is generated once")
    pending = [c for c in convs if c.id not in scan.done_ids]
    report.skipped = len(convs) - len(pending)
    if report.skipped:
        log(f"[generate-data] resuming: {report.skipped} of {len(convs)} ids already in {output_path} "
            f"({scan.success} success, {scan.errors} error)")
    stop_ids = resolve_stop_ids(target, target_dir)
    mine = pending[process_index::process_count]
    # never more slots than conversations: a small run does not pay for idle slots
    slots = max(1, min(settings.batch_size, len(mine)))
    bar = _progress(len(mine), progress)

    with RecordWriter(shard_path(output_path, process_index, process_count)) as writer:
        def on_done(c: Conversation) -> None:
            writer.write(c.result())
            if c.error is None:
                report.success += 1
            else:
                report.errors += 1
            if bar is not None:
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{report.new_tokens / max(elapsed, 1e-9):.1f}", errors=report.errors)

        t0 = time.perf_counter()
        with CompileTimer() as timer:
            regenerate(mine, engine_factory(target, draft, settings, stop_ids), target.tokenizer, num_slots=slots,
                       limit=prompt_limit(target, settings), vocab_size=target.config.vocab_size,
                       stop_ids=stop_ids, report=report, on_done=on_done)
        report.seconds = time.perf_counter() - t0
        report.compile_seconds = timer.seconds
    if bar is not None:
        bar.close()
    if process_count > 1:
        distributed.barrier("dspark_jax.generate_data.shards_written")
    if main:
        fold_shards(output_path, order=[c.id for c in pending])
    if process_count > 1:
        _sum_over_processes(report)
        distributed.barrier("dspark_jax.generate_data.assembled")
    return report


def _sum_over_processes(report: RunReport) -> None:
    """Makes ``report``'s per-process counts (records, tokens, seconds) the run's totals, on every process."""
    for fields, dtype in ((("success", "errors", "new_tokens"), np.int32),
                          (("seconds", "compile_seconds"), np.float32)):
        mine = np.asarray([getattr(report, f) for f in fields], dtype)
        every = np.asarray(multihost_utils.process_allgather(mine))
        for f, total in zip(fields, every.sum(axis=0)):
            setattr(report, f, type(getattr(report, f))(total))


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None

    return tqdm(total=total, desc="generate-data", unit="conv", file=sys.stderr)


# ---- command line -------------------------------------------------------------------------------------------

def cmd_generate_data(args) -> int:
    """Regenerates every assistant turn of a JSONL dataset with the target (speculative with --draft)."""
    if not os.path.isfile(args.input):
        raise SystemExit(f"error: --input {args.input!r} does not exist")
    try:
        check_writable(args.output)
    except OSError as e:
        raise SystemExit(f"error: {e}") from None
    target = load_target(args.target, dtype=args.dtype)
    if getattr(target, "tokenizer", None) is None:
        raise SystemExit(f"error: the target directory {args.target!r} has no tokenizer; generate-data renders "
                         "conversations with its chat template")
    draft = load_draft(args.draft) if args.draft else None
    settings = GenSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                           max_prompt_tokens=args.max_prompt_tokens, refill_at=args.refill_at)

    t0 = time.perf_counter()
    try:
        report = generate_data(target, draft, args.input, args.output, settings, target_dir=args.target,
                               progress=not args.no_progress, process_index=jax.process_index(),
                               process_count=jax.process_count())
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    wall = time.perf_counter() - t0
    if jax.process_index() != 0:
        return 0
    mode = "speculative" if draft is not None else "plain"
    steady = report.steady_tokens_per_s
    steady = f"; {steady:.1f} tokens/s without the {report.compile_seconds:.1f}s of compilation" \
        if steady is not None else ""
    print(f"[generate-data] {report.total} conversations: {report.success} success, {report.errors} error, "
          f"{report.skipped} already done; {report.new_tokens} new tokens in {report.seconds:.2f}s of {mode} "
          f"generation ({report.tokens_per_s:.1f} tokens/s, compilation included{steady}; slot utilisation "
          f"{report.slot_utilisation:.0%}), {wall:.1f}s wall")
    print(f"[generate-data] wrote {args.output}")
    return 0


def add_generate_data_parser(sub) -> None:
    p = sub.add_parser("generate-data", help="regenerate the assistant turns of training conversations",
                       description=cmd_generate_data.__doc__ + " Output: training-format JSONL "
                       '({"id", "conversations", "status"}), resumable: rerunning skips ids already written.')
    p.add_argument("--target", required=True, help="HF target directory (with tokenizer and chat template)")
    p.add_argument("--draft", default=None, help="DeepSpec draft directory: speculative decoding (lossless)")
    p.add_argument("--input", required=True, help="JSONL: {'id'?, 'conversations': [...]} (or 'turns') per line")
    p.add_argument("--output", required=True, help="output JSONL (appended to; ids already there are skipped)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8,
                   help="slots: requests decoding at once (default 8); a finished turn's slot takes the next "
                        "request at once (continuous batching), a conversation's next turn joins when its "
                        "previous one is done")
    p.add_argument("--refill-at", type=int, default=None,
                   help="hand back to the host to refill once this many slots are free (default batch-size // 8, "
                        "at least 1)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="per assistant turn (default 4096, spec §3.1)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer rendered histories are errors (default max_position_embeddings - max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.0, help="confidence threshold (with --draft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate_data)


__all__ = ["render_chat", "resolve_stop_ids", "stable_id", "scan_output", "RecordWriter", "check_writable",
           "Conversation", "source_messages", "read_conversations", "GenSettings", "RunReport", "request_id",
           "prompt_limit", "next_request", "add_turn", "engine_factory", "regenerate", "generate_data",
           "cmd_generate_data", "add_generate_data_parser"]
