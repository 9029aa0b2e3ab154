"""The style and type gate: `ruff check .` and `mypy` (configured in pyproject.toml) must be clean.

Why a test: CI runs the README's test command and nothing else, so the gate lives where it runs;
a contributor sees a lint failure as a failing test with the tool's own report.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_is_clean():
    proc = _run("ruff", "check", ".", "--output-format", "concise")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_is_clean():
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
