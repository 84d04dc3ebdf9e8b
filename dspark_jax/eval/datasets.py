"""Evaluation prompt sets in DeepSpec's format (spec §4.8): ``{"turns": ["first user turn", ...]}`` per line.

Only the first user turn is used (mt-bench included). A file larger than its cap is shuffled with
``random.Random(seed)`` and cut to the cap, as DeepSpec's ``eval.py`` does. Math prompts carry the
"Please reason step by step ..." instruction; the shipped files already contain it, so it is appended only
to a prompt that lacks it. Prompts are rendered with the target tokenizer's chat template: a single user
message, no system prompt, ``add_generation_prompt=True`` and ``enable_thinking=False``.
"""

from __future__ import annotations

import json
import os
import random

from dspark_jax.decode.synthetic import render_chat

# DeepSpec eval.py TASKS: (name, cap) in its default order.
DEFAULT_TASKS: tuple[tuple[str, int], ...] = (
    ("gsm8k", 500), ("math500", 500), ("aime25", 30), ("humaneval", 164), ("mbpp", 256),
    ("livecodebench", 500), ("mt-bench", 80), ("alpaca", 500), ("arena-hard-v2", 500),
)
DEFAULT_CAPS: dict[str, int] = dict(DEFAULT_TASKS)
MATH_DATASETS = frozenset({"gsm8k", "math500", "aime24", "aime25"})
MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


class DatasetError(ValueError):
    """A missing data directory / file, an unknown dataset name or a malformed line."""


def available_datasets(data_dir: str | os.PathLike) -> list[str]:
    """Dataset names (``*.jsonl`` stems) in ``data_dir``; a clear error when the directory is missing."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DatasetError(f"eval data directory {data_dir!r} does not exist (expected DeepSpec-format "
                           "<name>.jsonl files, e.g. the eval_datasets folder of DeepSpec)")
    return sorted(f[:-len(".jsonl")] for f in os.listdir(data_dir) if f.endswith(".jsonl"))


def resolve_names(data_dir: str | os.PathLike, names: str | list[str] | None) -> list[str]:
    """Comma-separated or list names -> validated names; None = DeepSpec's default tasks that are present."""
    avail = available_datasets(data_dir)
    if names is None:
        return [n for n, _ in DEFAULT_TASKS if n in avail]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise DatasetError("no dataset names given")
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise DatasetError(f"unknown dataset(s) {unknown} in {os.fspath(data_dir)!r}; available: "
                           f"{', '.join(avail) if avail else '(no .jsonl files there)'}")
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def read_first_turns(path: str | os.PathLike) -> list[str]:
    """First user turn of every record (``turns``, or the first user message of ``messages``/``conversations``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"eval dataset file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            turn = _first_turn(rec)
            if turn is None:
                raise DatasetError(f"{path}:{n}: expected {{'turns': [str, ...]}} (or a 'messages'/'conversations' "
                                   "list with a user message)")
            out.append(turn)
    return out


def _first_turn(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    turns = rec.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    conv = rec.get("messages", rec.get("conversations"))
    if isinstance(conv, list):
        for m in conv:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    return None


def with_math_suffix(name: str, text: str) -> str:
    """Appends the math instruction to a math-dataset prompt that does not already contain it."""
    if name not in MATH_DATASETS or MATH_SUFFIX in text:
        return text
    return text.rstrip("\n") + "\n" + MATH_SUFFIX


def load_prompts(data_dir: str | os.PathLike, name: str, max_samples: int | None = None,
                 seed: int = 980406) -> list[str]:
    """Prompt texts (first turns, math suffix applied) of one dataset, capped and shuffled like DeepSpec.

    ``max_samples`` None = the spec's default cap for ``name`` (all samples when it has none).
    """
    texts = read_first_turns(os.path.join(os.fspath(data_dir), f"{name}.jsonl"))
    cap = DEFAULT_CAPS.get(name) if max_samples is None else int(max_samples)
    if cap is not None and cap < 0:
        raise DatasetError(f"max_samples must be >= 0, got {cap}")
    if cap is not None and len(texts) > cap:
        texts = list(texts)
        random.Random(int(seed)).shuffle(texts)
        texts = texts[:cap]
    return [with_math_suffix(name, t) for t in texts]


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """The user turn rendered with the chat template (no system prompt, generation prompt, thinking off)."""
    return render_chat(tokenizer, [{"role": "user", "content": user_text}])


__all__ = ["DEFAULT_TASKS", "DEFAULT_CAPS", "MATH_DATASETS", "MATH_SUFFIX", "DatasetError", "available_datasets",
           "resolve_names", "read_first_turns", "with_math_suffix", "load_prompts", "chat_prompt_ids"]
