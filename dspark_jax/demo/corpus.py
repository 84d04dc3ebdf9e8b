"""A training corpus every machine with Python has: the standard library's own source.

Each function with a docstring becomes three DeepSpec-format conversations (spec §3.1):
  * "Write the function ``name(args)`` of module ``m``: <first docstring paragraph>" -> its source code;
  * its stub (``def`` line and docstring) in a fenced block, worded as the HumanEval prompts of the eval data
    ("Write a solution to the following problem ...") -> its source code;
  * "What does ``m.name`` do?" -> its docstring.
Files are split into train / held-out by a stable hash of their path, so held-out prompts come from modules
the target and drafts never saw. The result is deterministic for a given Python installation.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import textwrap
from typing import Iterator

__all__ = ["stdlib_root", "iter_function_conversations", "build_corpus", "STUB_PROMPT"]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _python_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # tests, site-packages, idle and the like are large, odd or not always present
        dirnames[:] = sorted(d for d in dirnames if d not in {"test", "tests", "site-packages", "idlelib",
                                                               "lib2to3", "__pycache__", "tkinter", "turtledemo",
                                                               "ensurepip", "venv"})
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def _first_paragraph(doc: str, limit: int) -> str:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(line.strip() for line in para.splitlines())
    return para[:limit]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # noqa: BLE001 - an exotic signature: the bare name will do
        return f"{node.name}(...)"


# the wording of the HumanEval prompts in the eval data, so the target learns to answer them
STUB_PROMPT = "Write a solution to the following problem and make sure that it passes the tests:"


def _stub(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The ``def`` line(s) and the docstring of ``node``, dedented (None when the body is only the docstring)."""
    if len(node.body) < 2:
        return None
    lines = source.splitlines()[node.lineno - 1:node.body[0].end_lineno]
    return textwrap.dedent("\n".join(lines))


def iter_function_conversations(path: str, root: str, max_source_chars: int) -> Iterator[dict]:
    """Conversations from one source file (nothing if it does not parse)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("__"):
            continue
        seg = ast.get_source_segment(source, node)
        if seg is None or len(seg) > max_source_chars:
            continue
        code = textwrap.dedent(" " * node.col_offset + seg)
        summary = _first_paragraph(doc, 300)
        if len(summary) < 20:
            continue
        ident = hashlib.sha1(f"{module}:{node.lineno}".encode()).hexdigest()[:12]
        yield {"id": f"code-{ident}", "conversations": [
            {"role": "user", "content": f"Write the function `{_signature(node)}` of module `{module}`: {summary}"},
            {"role": "assistant", "content": f"```python\n{code}\n```"}], "status": "success"}
        stub = _stub(source, node)
        if stub:
            yield {"id": f"stub-{ident}", "conversations": [
                {"role": "user", "content": f"{STUB_PROMPT}\n```python\n{stub}\n\n```"},
                {"role": "assistant", "content": f"```python\n{code}\n```"}], "status": "success"}
        yield {"id": f"doc-{ident}", "conversations": [
            {"role": "user", "content": f"What does `{module}.{node.name}` do?"},
            {"role": "assistant", "content": textwrap.dedent(doc).strip()[:1200]}], "status": "success"}


def build_corpus(out_dir: str, *, max_conversations: int, heldout_fraction: float = 0.1,
                 max_source_chars: int = 1500, root: str | None = None) -> dict:
    """Writes ``train.jsonl`` and ``heldout.jsonl`` under ``out_dir``; returns counts.

    Files go to held-out when the first byte of sha1(relative path) < 256 * heldout_fraction; conversations are
    taken in file order until ``max_conversations`` (train) and ``max_conversations * heldout_fraction``
    (held-out) are reached."""
    root = root or stdlib_root()
    os.makedirs(out_dir, exist_ok=True)
    want = {"train": max_conversations, "heldout": max(1, int(max_conversations * heldout_fraction))}
    files = _python_files(root)
    # interleave files from everywhere in the tree (not just the alphabetically first modules)
    files.sort(key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode()).hexdigest())
    counts = {"train": 0, "heldout": 0, "files": {"train": 0, "heldout": 0}}
    handles = {k: open(os.path.join(out_dir, f"{k}.jsonl"), "w", encoding="utf-8") for k in want}
    try:
        for path in files:
            rel = os.path.relpath(path, root)
            split = "heldout" if hashlib.sha1(rel.encode()).digest()[0] < 256 * heldout_fraction else "train"
            if counts[split] >= want[split]:
                if all(counts[k] >= want[k] for k in want):
                    break
                continue
            n0 = counts[split]
            for conv in iter_function_conversations(path, root, max_source_chars):
                if counts[split] >= want[split]:
                    break
                handles[split].write(json.dumps(conv, ensure_ascii=False) + "\n")
                counts[split] += 1
            counts["files"][split] += counts[split] > n0
    finally:
        for h in handles.values():
            h.close()
    return counts
