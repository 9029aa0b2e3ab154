"""`pipeline.py evaluate` scores SAEs on a cache in S3 (the real SeaweedFS server) exactly as on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache.copy import copy_cache
from fast_sae.actcache.from_arrays import write_cache_from_arrays

from .helpers import save_pca_sae

pytestmark = pytest.mark.slow  # a real S3 server and CLI subprocesses
ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_reads_a_cache_in_s3(s3, tmp_path):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4000, 24)) @ rng.standard_normal((24, 24))).astype(np.float32)
    local = tmp_path / "cache"
    write_cache_from_arrays(local, {2: x}, seq_starts=np.arange(0, 4001, 100), chunk_tokens=512)
    url = f"s3://{s3.bucket()}/eval"
    copy_cache(local, url, options={"endpoint": s3.endpoint})
    sae = save_pca_sae(tmp_path / "sae", x[:3000], 2, 6, model_name="synthetic")
    reports = {}
    for name, where in (("disk", str(local)), ("s3", url)):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "pipeline.py", "evaluate", "--sae", str(sae), "--eval-cache", where,
                               "--out", str(out), "--no-downstream", "--no-progress", "--eval-range", "30:40",
                               "--storage-option", f"endpoint={s3.endpoint}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((out / "report.json").read_text())
    a, b = ({k: v for k, v in reports[k]["rows"][0]["reconstruction"].items() if k != "feature_frequency_file"}
            for k in ("disk", "s3"))
    assert a["subsets"]["all"]["n_tokens"] == 1000 and a == b
    assert np.array_equal(np.load(tmp_path / "disk" / "feature_frequency" / "sae.npy"),
                          np.load(tmp_path / "s3" / "feature_frequency" / "sae.npy"))
