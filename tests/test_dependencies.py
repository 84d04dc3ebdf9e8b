"""The package's runtime imports are declared: every third-party module imported by ``dspark_jax`` comes from a
distribution in ``[project].dependencies``, or from an optional extra and then only inside ``try: ... except
ImportError`` (the feature degrades with a message). Libraries we call for a feature that needs another package
(transformers' chat templates need jinja2) have it declared too. A fresh ``pip install .`` must run the demo."""

import ast
import os
import re
import sys
from importlib.metadata import packages_distributions

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dspark_jax")

# feature used in the package source -> the distribution it needs that its library does not install itself
FEATURE_NEEDS = {"apply_chat_template": "jinja2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", r.strip()).group(0)) for r in reqs}


@pytest.fixture(scope="module")
def declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = {k: _requirement_names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return _requirement_names(project["dependencies"]), extras


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
               for n in names)


def third_party_imports():
    """(file, line, top-level module, guarded) for every import of a module outside the stdlib and the package;
    guarded = inside the body of a ``try`` that catches ImportError."""
    found = []
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)

            def visit(node, guarded):
                if isinstance(node, ast.Try):
                    body_guarded = guarded or any(_catches_import_error(h) for h in node.handlers)
                    for child in node.body:
                        visit(child, body_guarded)
                    for child in node.handlers + node.orelse + node.finalbody:
                        visit(child, guarded)
                    return
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                for m in mods:
                    top = m.split(".")[0]
                    if top != "dspark_jax" and top not in sys.stdlib_module_names and top != "__future__":
                        found.append((os.path.relpath(path, ROOT), node.lineno, top, guarded))
                for child in ast.iter_child_nodes(node):
                    visit(child, guarded)

            visit(tree, False)
    return found


def test_the_scan_sees_the_package():
    tops = {t for _, _, t, _ in third_party_imports()}
    assert {"jax", "flax", "numpy", "transformers", "matplotlib"} <= tops, tops


def test_every_third_party_import_is_declared(declared):
    deps, extras = declared
    dists = packages_distributions()
    problems = []
    for path, line, top, guarded in third_party_imports():
        provided = {_norm(d) for d in dists.get(top, [])}
        if not provided:
            problems.append(f"{path}:{line}: imports {top}, which no installed distribution provides")
        elif provided & deps:
            continue
        elif not any(provided & names for names in extras.values()):
            problems.append(f"{path}:{line}: imports {top} ({', '.join(sorted(provided))}), not declared")
        elif not guarded:
            extra = next(k for k, names in extras.items() if provided & names)
            problems.append(f"{path}:{line}: imports {top} from the optional extra [{extra}] outside a "
                            "try/except ImportError")
    assert not problems, "\n".join(problems)


def test_library_features_have_their_dependencies(declared):
    deps, _ = declared
    source = ""
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    source += f.read()
    for feature, dist in FEATURE_NEEDS.items():
        if feature in source:
            assert _norm(dist) in deps, f"the package uses {feature}, which needs {dist}: add it to dependencies"
