"""The package's import layering (issue 31): every ``dspark_jax`` import, at module level or inside a function,
goes down (or sideways within a layer), never up, and the module-level imports have no cycle.

Layers, lowest first: kernels, config, cache, sharding | distributed, host_memory | nn | decode.sampling,
decode.verify, decode.metrics | targets, drafts | convert | decode | eval | train, testing | demo | cli | the package
root (``dspark_jax``).
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dspark_jax")

RANKS = {"kernels": 0, "config": 0, "cache": 0, "sharding": 0, "distributed": 1, "host_memory": 1, "nn": 2,
         "decode.sampling": 3, "decode.verify": 3, "decode.metrics": 3, "targets": 4, "drafts": 4, "convert": 5,
         "decode": 6, "eval": 7, "train": 8, "testing": 8, "demo": 9, "cli": 10, "": 11}

# Imports a function body may still make (everything else is imported at module level): optional extras, JAX
# internals read where they are used, and the heavy libraries only tokenizer and data-pipeline code needs (they
# would add seconds to every ``import dspark_jax``).
LAZY_IMPORTS = {
    "matplotlib": "the plot extra", "tensorboardX": "the tensorboard extra", "sentencepiece": "the sentencepiece extra",
    "jax._src": "private JAX API, read where it is used",
    "transformers": "heavy: tokenizers and chat templates only", "tokenizers": "heavy: the tiny tokenizer only",
    "grain": "heavy: the training input pipeline only",
}


def _layer(module: str) -> str:
    """``dspark_jax.decode.sampling`` -> ``decode.sampling`` (a layer of its own), ``dspark_jax.decode.x`` ->
    ``decode``, ``dspark_jax`` -> ``""`` (the root)."""
    parts = module.split(".")[1:]
    if len(parts) >= 2 and ".".join(parts[:2]) in RANKS:
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path: str):
    """(imported module, in a function body) for every ``dspark_jax`` import of a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dspark_jax":
            # ``from dspark_jax.kernels import _dispatch`` imports the module dspark_jax.kernels._dispatch (and
            # ``from dspark_jax import kernels`` dspark_jax.kernels, not the root)
            for a in node.names:
                name = f"{node.module}.{a.name}"
                yield (name if _is_module(name) else node.module), node.col_offset > 0
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "dspark_jax":
                    yield a.name, node.col_offset > 0


def _is_module(name: str) -> bool:
    rel = os.path.join(os.path.dirname(PACKAGE), *name.split("."))
    return os.path.exists(rel + ".py") or os.path.isdir(rel)


def test_no_import_goes_up_a_layer():
    bad = []
    for module, path in _modules():
        src = _layer(module)
        for imported, in_body in _imports(path):
            dst = _layer(imported)
            if dst == src or RANKS[dst] <= RANKS[src]:
                continue
            bad.append(f"{module} imports {imported} ({src} -> {dst}{', in a function' if in_body else ''})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    graph = {}
    for module, path in _modules():
        graph[module] = {m for m, in_body in _imports(path) if not in_body and m != module}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_bodies_import_only_what_must_wait():
    """No import inside a function works around a cycle or an upward import: every ``dspark_jax`` import and every
    required library is imported at module level; only :data:`LAZY_IMPORTS` may wait."""
    bad = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
                continue
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module in ("jax.experimental.pallas", "jax"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if not any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY_IMPORTS):
                    bad.append(f"{module}:{node.lineno} imports {name} in a function")
    assert not bad, "function-body imports (move them to the top of the module):\n" + "\n".join(bad)
