"""The lint config of issue 31 (``[tool.ruff]`` in pyproject.toml: E, F, W, I; line length 120) holds for the
package, the tests and the scripts, so a regression fails the suite instead of waiting for someone to run ruff."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("ruff", reason="ruff is not installed (it is in the test extra: pip install -e '.[test]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "dspark_jax", "tests", "scripts"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
