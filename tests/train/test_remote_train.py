"""Training from a cache in S3 (the real SeaweedFS server) gives the weights training from disk gives,
in one process and under torchrun (gloo, 2 processes); the credentials stay out of the run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fast_sae.actcache.copy import copy_cache
from tests.s3server import SECRET_KEY

pytestmark = pytest.mark.slow  # a real S3 server and real training subprocesses

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--layers", "3,7", "--architectures", "standard,topk", "--expansion-factors", "2", "--tokens", "4000",
        "--batch-tokens", "100", "--buffer-tokens", "1000", "--eval-sequences", "10", "--log-every", "10",
        "--k", "4", "--no-progress"]
RUNNER = ("import sys, torch; torch.set_num_threads(1); from fast_sae.train.cli import train_cmd; "
          "train_cmd(sys.argv[1:])")
NAMES = ("L3_standard_x2_l1_5", "L3_topk_x2_k4", "L7_standard_x2_l1_5", "L7_topk_x2_k4")


def _same_weights(a: Path, b: Path) -> None:
    for name in NAMES:
        wa = load_file(str(a / name / "sae_weights.safetensors"))
        wb = load_file(str(b / name / "sae_weights.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def _no_secret(folder: Path, *texts: str) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            assert SECRET_KEY.encode() not in f.read_bytes(), f
    for t in texts:
        assert SECRET_KEY not in t


@pytest.fixture(scope="module")
def remote_cache(s3, small_cache):
    url = f"s3://{s3.bucket()}/small"
    copy_cache(small_cache, url, options={"endpoint": s3.endpoint})
    return url, ["--storage-option", f"endpoint={s3.endpoint}"]


def test_train_from_s3_equals_train_from_disk(small_cache, remote_cache, tmp_path):
    url, flags = remote_cache
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    local = subprocess.run([sys.executable, "-c", RUNNER, str(small_cache), "--out", str(tmp_path / "disk"), *ARGS],
                           env=env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = subprocess.run([sys.executable, "-c", RUNNER, url, "--out", str(tmp_path / "s3"), *ARGS, *flags],
                            env=env, capture_output=True, text=True, timeout=600)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "data wait:" in remote.stdout
    _same_weights(tmp_path / "disk", tmp_path / "s3")
    _no_secret(tmp_path / "s3", remote.stdout, remote.stderr)


def test_torchrun_ranks_read_their_layers_from_s3(small_cache, remote_cache, tmp_path):
    url, flags = remote_cache
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-c", RUNNER, str(small_cache), "--out", str(tmp_path / "one"), *ARGS],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    script = tmp_path / "run_train.py"
    script.write_text(RUNNER.replace("; ", "\n"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), url, "--out", str(tmp_path / "two"), *ARGS, *flags],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 0] 2 SAEs on layers [3]" in two.stdout and "[rank 1] 2 SAEs on layers [7]" in two.stdout
    _same_weights(tmp_path / "one", tmp_path / "two")
    _no_secret(tmp_path / "two", two.stdout, two.stderr)
