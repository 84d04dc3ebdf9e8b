"""What the benchmark scripts share that needs no JAX: their argument parser and its plain options, the random Qwen3
size options, the machine's name and the ``--json-out`` file.

Standard library only: bench_target.py's transformers worker imports this and must not import JAX (the two runtimes'
thread pools fight in one process), and bench_train_step.py's orchestrator leaves JAX to its workers.
"""

from __future__ import annotations

import argparse
import json
import platform

# the size of the random Qwen3 target that bench_scheduler.py profiles and bench_target.py builds with transformers
QWEN3_SIZE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
                  vocab_size=32000)


def parser(doc: str) -> argparse.ArgumentParser:
    """The scripts' parser: ``doc`` (the module docstring) as the description, printed as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_options(ap, **defaults) -> None:
    """One ``--name`` option per keyword, in the keywords' order (``block_size`` -> ``--block-size``), typed by its
    default: an int or a float parses as one, ``False`` makes a flag, a string or None is kept as given."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            if default:
                raise ValueError(f"{flag}: a flag defaults to False")
            ap.add_argument(flag, action="store_true")
        elif isinstance(default, (int, float)):
            ap.add_argument(flag, type=type(default), default=default)
        else:
            ap.add_argument(flag, default=default)


def add_qwen3_size_options(ap) -> None:
    """``--hidden-size`` ... ``--vocab-size``: the random Qwen3 target's size (defaults ``QWEN3_SIZE``)."""
    add_options(ap, **QWEN3_SIZE)


def qwen3_size(args) -> dict:
    """The options of :func:`add_qwen3_size_options` as Qwen3 config fields (transformers' names, which
    ``dspark_jax``'s ``TargetConfig`` shares)."""
    return dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim)


def machine() -> str:
    """The processor's name as Python reports it, else the machine type (``x86_64``)."""
    return platform.processor() or platform.machine()


def write_json(path: str | None, obj, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``; nothing when ``path`` is None (every script's ``--json-out`` is optional)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=indent)
