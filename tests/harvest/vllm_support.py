"""Running the real CLI under the vLLM venv (made by setup_vllm.sh), for the vLLM engine's tests.

vLLM lives in its own venv (it pins torch and transformers), so these tests run
``<venv>/bin/python pipeline.py harvest --backend vllm ...`` as subprocesses, the way a user does,
and compare what they write with caches the transformers engine wrote in this Python. A missing
venv fails the tests (it is part of the install), it never skips them.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

_SETTING = os.environ.get("FAST_SAE_VLLM_VENV", "off")  # tests/conftest.py sets "off" for this Python's harvests
VLLM_VENV = ROOT / (".venv-vllm" if _SETTING == "off" else _SETTING)

# Both runs match the shared caches of tests/conftest.py (fast_cache, btf_cache) in every argument that
# shapes the token stream, so the streams are identical. --batch-tokens is vLLM's per-step token budget:
# below the longest FAST conversation (66 tokens) and below the BT block (128), so long prompts are
# split over several steps (chunked prefill).
FAST_ARGS = ["--regime", "fast", "--max-tokens", "3000", "--context-size", "256", "--layers", "2,5",
             "--chunk-tokens", "512", "--batch-tokens", "48"]
BTF_ARGS = ["--regime", "bt-f", "--max-tokens", "2048", "--context-size", "128", "--layers", "2,5",
            "--chunk-tokens", "512", "--batch-tokens", "64"]
FAST_BUDGET, BTF_BUDGET = 48, 64


def vllm_python() -> Path:
    py = VLLM_VENV / "bin" / "python"
    if not py.is_file():
        pytest.fail(f"{VLLM_VENV}: the vLLM venv is missing; run ./setup_vllm.sh (setup.sh runs it) to create it")
    return py


def vllm_env() -> dict[str, str]:
    # this checkout's package, whichever checkout the venv was installed from
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_vllm_cli(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``<vllm venv>/bin/python pipeline.py ARGS``; returns the completed process."""
    proc = subprocess.run([str(vllm_python()), str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=vllm_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"[vllm venv] pipeline.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
