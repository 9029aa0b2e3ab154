"""Helpers shared by the tests: running the real CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python pipeline.py ARGS` as a real subprocess; returns the completed process."""
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# `pipeline.py train` in a fresh interpreter on one torch thread, so separate runs compare bit for bit
TRAIN_RUNNER = ("import sys, torch; torch.set_num_threads(1); from fast_sae.train.cli import train_cmd; "
                "train_cmd(sys.argv[1:])")


def train_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_train(*args: str, nproc: int = 1, workdir: Path | None = None, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Train in a real subprocess (``nproc`` > 1: under torchrun, gloo, with its script in ``workdir``;
    ``env``: extra environment variables); a failure is an AssertionError with the tail of stderr."""
    if nproc == 1:
        cmd = [sys.executable, "-c", TRAIN_RUNNER, *args]
    else:
        assert workdir is not None, "torchrun needs a folder for its script"
        script = workdir / "run_train.py"
        script.write_text(TRAIN_RUNNER.replace("; ", "\n"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), *args]
    proc = subprocess.run(cmd, env={**train_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
