"""Kill a real harvest subprocess mid-run, rerun it, and compare the cache byte for byte."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fast_sae.actcache import ActivationCache
from tests.helpers import ROOT, run_cli

ARGS = ["--max-tokens", "6000", "--layers", "1,3", "--context-size", "256", "--chunk-tokens", "256",
        "--batch-tokens", "512"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _committed(path: Path) -> int:
    """Tokens in committed chunks (format version 2: one commits/{i}.json record per done chunk)."""
    folder = path / "commits"
    return 256 * len(list(folder.glob("*.json"))) if folder.is_dir() else 0


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path):
    ref = tmp_path / "ref"
    run_cli("harvest", "--out", str(ref), *ARGS)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "harvest", "--out", str(killed), *ARGS],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _committed(killed) < 1024 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ActivationCache.open(killed, require_complete=False)
    assert not partial.complete and 0 < partial.tokens_committed < partial.n_tokens
    with pytest.raises(Exception, match="harvest not finished"):
        ActivationCache.open(killed)
    out = run_cli("harvest", "--out", str(killed), *ARGS)
    assert "resuming;" in out.stdout + out.stderr
    a, b = _files(ref), _files(killed)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # a third run has nothing to do
    assert "already complete" in run_cli("harvest", "--out", str(killed), *ARGS).stdout
