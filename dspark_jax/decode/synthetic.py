"""Training-data regeneration with the target (spec §3.1): every assistant turn is rewritten by the target.

DeepSpec does this through an OpenAI-compatible server (``scripts/data/generate_train_data.py``); here the
target (and, optionally, a draft for speculative decoding, which is lossless) runs in-process, batched across
conversations. Per conversation, messages are walked in order as DeepSpec does: system messages are kept,
input assistant messages are dropped, and after each user message the history is rendered with the chat
template (generation prompt, ``enable_thinking=False``) and the target generates the assistant turn, which
is appended before the next user turn. Conversations of a batch advance turn by turn together.

The output is JSONL in the training format ``{"id", "conversations", "status": "success"}`` (other input keys
are kept). It is resumable and crash-safe: each finished record is one ``write`` + ``flush`` of a whole line;
on start, ids already in the output are skipped and a trailing partial line (a crash mid-write) is cut away.
A conversation that fails is written as ``{"id", ..., "status": "error", "error": "..."}`` and the run goes
on (the training reader drops non-success records). Input records without an id get a stable one: a hash
of their content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

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
    max_new_tokens: int = 4096
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    threshold: float = 0.0
    seed: int = 0
    batch_size: int = 8
    max_prompt_tokens: int | None = None


@dataclasses.dataclass
class RunReport:
    total: int = 0
    skipped: int = 0
    duplicates: int = 0
    success: int = 0
    errors: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    truncated_bytes: int = 0
    bad_lines: int = 0
    # calls whose compiled shape (batch, prompt bucket) had run before: throughput without compilation
    steady_tokens: int = 0
    steady_seconds: float = 0.0
    shapes: set = dataclasses.field(default_factory=set, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else None

    def add_call(self, shape, tokens: int, seconds: float) -> None:
        self.new_tokens += tokens
        self.seconds += seconds
        if shape in self.shapes:
            self.steady_tokens += tokens
            self.steady_seconds += seconds
        self.shapes.add(shape)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "shapes"}
        return {**d, "tokens_per_s": self.tokens_per_s, "steady_tokens_per_s": self.steady_tokens_per_s}


def generate_padded(target, draft, prompts: list[list[int]], batch_size: int, settings: GenSettings,
                    stop_ids: tuple[int, ...], seed: int):
    """Runs ``prompts`` (at most ``batch_size``) padded to ``batch_size`` rows (repeating the last prompt, so the
    compiled shape repeats); returns (GenerationOutput, number of real rows)."""
    import dspark_jax as dj

    real = len(prompts)
    if not 0 < real <= batch_size:
        raise ValueError(f"need 1..{batch_size} prompts, got {real}")
    rows = list(prompts) + [prompts[-1]] * (batch_size - real)
    kw = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
              top_p=settings.top_p, stop_token_ids=stop_ids, seed=seed)
    if draft is None:
        return dj.generate(target, rows, **kw), real
    return dj.speculative_generate(target, draft, rows, threshold=settings.threshold, **kw), real


def _decode(tokenizer, ids: list[int], stop_ids: tuple[int, ...]) -> tuple[str, str]:
    finish = "length"
    if ids and ids[-1] in stop_ids:
        ids, finish = ids[:-1], "stop"
    return tokenizer.decode(ids, skip_special_tokens=True), finish


def regenerate_batch(target, draft, convs: list[Conversation], settings: GenSettings, stop_ids: tuple[int, ...],
                     seed: int, report: RunReport) -> None:
    """Regenerates every assistant turn of ``convs`` (at most ``batch_size``) in place, turn index by turn index.
    A conversation that fails gets ``.error``; the others go on."""
    tok = target.tokenizer
    limit = settings.max_prompt_tokens
    if limit is None:
        limit = target.config.max_position_embeddings - settings.max_new_tokens
    live = [c for c in convs if c.error is None]
    turn = 0
    while True:
        live = [c for c in live if c.error is None and c.next_user_turn()]
        if not live:
            return
        ready, prompts = [], []
        for c in live:
            try:
                ids = render_chat(tok, c.history)
            except Exception as e:  # jinja errors, template raise_exception, ...
                c.error = f"turn {turn}: chat template failed: {type(e).__name__}: {e}"
                continue
            if len(ids) > limit:
                c.error = (f"turn {turn}: prompt has {len(ids)} tokens, over the limit of {limit} "
                           f"(max_position_embeddings - max_new_tokens, or --max-prompt-tokens)")
                continue
            ready.append(c)
            prompts.append(ids)
        if ready:
            _generate_turn(target, draft, ready, prompts, settings, stop_ids, seed + turn, turn, report)
        turn += 1


def _generate_turn(target, draft, ready, prompts, settings, stop_ids, seed, turn, report) -> None:
    from dspark_jax.config import next_bucket

    def run(rows):
        out, real = generate_padded(target, draft, rows, settings.batch_size, settings, stop_ids, seed)
        shape = (settings.batch_size, next_bucket(max(len(r) for r in rows)))
        report.add_call(shape, int(out.lengths[:real].sum()), out.stats["seconds"])
        return out

    try:
        out = run(prompts)
        outs = [(c, out, i) for i, c in enumerate(ready)]
    except Exception as batch_error:  # isolate the failing conversation(s): one at a time
        if len(ready) == 1:
            ready[0].error = f"turn {turn}: generation failed: {type(batch_error).__name__}: {batch_error}"
            return
        outs = []
        for c, ids in zip(ready, prompts):
            try:
                outs.append((c, run([ids]), 0))
            except Exception as e:
                c.error = f"turn {turn}: generation failed: {type(e).__name__}: {e}"
    for c, out, i in outs:
        ids = out.tokens[i, :out.lengths[i]].tolist()
        text, finish = _decode(target.tokenizer, ids, stop_ids)
        c.history.append({"role": "assistant", "content": text})
        c.new_tokens.append(len(ids))
        c.finish.append(finish)


def generate_data(target, draft, input_path: str | os.PathLike, output_path: str | os.PathLike,
                  settings: GenSettings, *, target_dir: str | os.PathLike | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, process_index: int = 0,
                  process_count: int = 1) -> RunReport:
    """Regenerates the assistant turns of ``input_path`` into ``output_path`` (resumable). Returns a report.

    With ``process_count > 1`` (every process of a ``jax.distributed`` run calls this with its index) the
    batches are dealt out round-robin by index -- batch ``k`` to process ``k % process_count``, with the seed
    and rows it has on one process -- each process writes its own resumable shard
    (:mod:`~dspark_jax.decode.jsonl_shards`) and process 0 assembles ``output_path`` in the one-process order.
    The report then counts the records and tokens of all processes."""
    from dspark_jax import distributed
    from dspark_jax.decode.jsonl_shards import fold_shards, shard_path

    main = process_index == 0
    if getattr(target, "tokenizer", None) is None:
        raise ValueError("the target has no tokenizer: generate-data needs the tokenizer files and chat template "
                         "in the target directory")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {settings.batch_size}")
    check_writable(output_path)
    convs, dups = read_conversations(input_path)
    truncated = 0
    if main:  # cut a crash's partial line, take in the shards an interrupted multi-process run left
        truncated = scan_output(output_path).truncated_bytes
        fold_shards(output_path)
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
    # never pad a small run up to the full batch size; the compiled shape still repeats across batches
    settings = dataclasses.replace(settings, batch_size=max(1, min(settings.batch_size, len(pending))))
    starts = list(range(0, len(pending), settings.batch_size))[process_index::process_count]
    bar = _progress(sum(min(settings.batch_size, len(pending) - b) for b in starts), progress)
    path = output_path if process_count == 1 else shard_path(output_path, process_index, process_count)
    with RecordWriter(path) as writer:
        for b in starts:
            batch = pending[b:b + settings.batch_size]
            regenerate_batch(target, draft, batch, settings, stop_ids, settings.seed + 1_000_003 * b, report)
            for c in batch:
                writer.write(c.result())
                if c.error is None:
                    report.success += 1
                else:
                    report.errors += 1
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{report.tokens_per_s:.1f}", errors=report.errors)
    if bar is not None:
        bar.close()
    if process_count > 1:
        distributed.barrier("dspark_jax.generate_data.shards_written")
        if main:
            fold_shards(output_path, order=[c.id for c in pending])
        _sum_over_processes(report)
        distributed.barrier("dspark_jax.generate_data.assembled")
    return report


def _sum_over_processes(report: RunReport) -> None:
    """Makes ``report``'s per-process counts (records, tokens, seconds) the run's totals, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    for fields, dtype in ((("success", "errors", "new_tokens", "steady_tokens"), np.int32),
                          (("seconds", "steady_seconds"), np.float32)):
        mine = np.asarray([getattr(report, f) for f in fields], dtype)
        every = np.asarray(multihost_utils.process_allgather(mine))
        for f, total in zip(fields, every.sum(axis=0)):
            setattr(report, f, type(getattr(report, f))(total))


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate-data", unit="conv", file=sys.stderr)


# ---- command line -------------------------------------------------------------------------------------------

def cmd_generate_data(args) -> int:
    """Regenerates every assistant turn of a JSONL dataset with the target (speculative with --draft)."""
    import dspark_jax as dj

    if not os.path.isfile(args.input):
        raise SystemExit(f"error: --input {args.input!r} does not exist")
    try:
        check_writable(args.output)
    except OSError as e:
        raise SystemExit(f"error: {e}") from None
    target = dj.load_target(args.target, dtype=args.dtype)
    if getattr(target, "tokenizer", None) is None:
        raise SystemExit(f"error: the target directory {args.target!r} has no tokenizer; generate-data renders "
                         "conversations with its chat template")
    draft = dj.load_draft(args.draft) if args.draft else None
    settings = GenSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                           max_prompt_tokens=args.max_prompt_tokens)
    import jax

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
    steady = f"; {steady:.1f} tokens/s on already-compiled shapes" if steady is not None else ""
    print(f"[generate-data] {report.total} conversations: {report.success} success, {report.errors} error, "
          f"{report.skipped} already done; {report.new_tokens} new tokens in {report.seconds:.2f}s of {mode} "
          f"generation ({report.tokens_per_s:.1f} tokens/s, compilation included{steady}), {wall:.1f}s wall")
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
    p.add_argument("--batch-size", type=int, default=8, help="conversations per batch (default 8)")
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
           "Conversation", "source_messages", "read_conversations", "GenSettings", "RunReport",
           "generate_padded", "regenerate_batch", "generate_data", "cmd_generate_data", "add_generate_data_parser"]
