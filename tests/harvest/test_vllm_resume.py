"""Kill a real vLLM harvest with SIGKILL mid-run, resume it, and get the bytes of one uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fast_sae.actcache import ActivationCache
from tests.harvest.vllm_support import FAST_ARGS, run_vllm_cli, vllm_env, vllm_python
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow
CHUNK = int(FAST_ARGS[FAST_ARGS.index("--chunk-tokens") + 1])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _committed(path: Path) -> int:
    """Tokens in committed chunks (format version 2: one commits/{i}.json record per done chunk)."""
    folder = path / "commits"
    return CHUNK * len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def test_kill_and_resume_is_byte_identical(vllm_fast, tmp_path) -> None:
    ref, _ = vllm_fast  # the same arguments, one uninterrupted run
    killed = tmp_path / "killed"
    args = ["harvest", "--out", str(killed), "--backend", "vllm", *FAST_ARGS]
    # its own session: SIGKILL goes to the harvest and anything vLLM started, as a real kill would
    proc = subprocess.Popen([str(vllm_python()), str(ROOT / "pipeline.py"), *args], cwd=ROOT, env=vllm_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while _committed(killed) < 512 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "harvest finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = ActivationCache.open(killed, require_complete=False)
    assert not partial.complete and 0 < partial.tokens_committed < partial.n_tokens

    # the transformers engine may not finish what vLLM started (this Python has no vLLM: auto -> hf)
    other = run_cli("harvest", "--out", str(killed), *FAST_ARGS, check=False)
    assert other.returncode != 0 and "backend (cache: 'vllm', now: 'hf')" in other.stderr

    out = run_vllm_cli(*args)
    assert "resuming;" in out.stdout + out.stderr
    a, b = _files(ref), _files(killed)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert "already complete" in run_vllm_cli(*args).stdout
