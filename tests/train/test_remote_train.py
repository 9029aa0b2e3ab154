"""Training from a cache in S3 (the real SeaweedFS server) gives the weights training from disk gives,
in one process and under torchrun (gloo, 2 processes); the credentials stay out of the run folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fast_sae.actcache.copy import copy_cache
from tests.helpers import run_train
from tests.s3server import SECRET_KEY
from tests.train.test_distributed import ARGS

pytestmark = pytest.mark.slow  # a real S3 server and real training subprocesses

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
    run_train(str(small_cache), "--out", str(tmp_path / "disk"), *ARGS)
    remote = run_train(url, "--out", str(tmp_path / "s3"), *ARGS, *flags)
    assert "data wait:" in remote.stdout
    _same_weights(tmp_path / "disk", tmp_path / "s3")
    _no_secret(tmp_path / "s3", remote.stdout, remote.stderr)


def test_torchrun_ranks_read_their_layers_from_s3(small_cache, remote_cache, tmp_path):
    url, flags = remote_cache
    run_train(str(small_cache), "--out", str(tmp_path / "one"), *ARGS)
    two = run_train(url, "--out", str(tmp_path / "two"), *ARGS, *flags, nproc=2, workdir=tmp_path)
    assert "[rank 0] 2 SAEs on layers [3]" in two.stdout and "[rank 1] 2 SAEs on layers [7]" in two.stdout
    _same_weights(tmp_path / "one", tmp_path / "two")
    _no_secret(tmp_path / "two", two.stdout, two.stderr)
