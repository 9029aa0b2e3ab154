"""`pipeline.py evaluate` (real subprocesses) on checkpoints whose fields are read strictly: a TopK k
wider than the SAE, a hook name with non-ASCII digits and an unknown dtype are one line each; an SAE
that reconstructs exactly gets log2 MSE −inf with a note in report.md, not a bare −inf."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache.from_arrays import write_cache_from_arrays

from .helpers import save_identity_sae, save_random_sae

pytestmark = pytest.mark.slow  # CLI subprocesses
ROOT = Path(__file__).resolve().parents[2]
D, LAYER = 8, 2


def _evaluate(sae: Path, cache: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", "evaluate", "--sae", str(sae), "--eval-cache", str(cache),
                           "--out", str(out), "--no-downstream", "--no-progress", "--eval-range", "5:10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _edit(sae: Path, change) -> Path:
    doc = json.loads((sae / "cfg.json").read_text())
    change(doc)
    (sae / "cfg.json").write_text(json.dumps(doc))
    return sae


@pytest.fixture
def cache(tmp_path) -> Path:
    x = np.random.default_rng(0).standard_normal((400, D)).astype(np.float32)
    return write_cache_from_arrays(tmp_path / "cache", {LAYER: x}, seq_starts=np.arange(0, 401, 40), chunk_tokens=128)


@pytest.mark.parametrize("case", ["k_above_d_sae", "arabic_digit_hook", "dtype"])
def test_loose_checkpoint_fields_are_one_line(cache, tmp_path, case):
    sae = save_random_sae(tmp_path / "sae", D, 16, LAYER, architecture="topk", k=4)
    edits = {"k_above_d_sae": (lambda d: d.update(k=40), "field 'k' = 40, expected 1..d_sae (16)"),
             "arabic_digit_hook": (lambda d: d["metadata"].update(hook_name="blocks.\u0662.hook_resid_post"),
                                   "hook_name 'blocks.\u0662.hook_resid_post' cannot be scored"),
             "dtype": (lambda d: d.update(dtype="float1024"), "field 'dtype' = 'float1024', expected one of")}
    change, message = edits[case]
    proc = _evaluate(_edit(sae, change), cache, tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "cfg.json" in line and message in line, proc.stderr[-2000:]


def test_an_exact_reconstruction_is_noted_not_just_minus_infinity(cache, tmp_path):
    sae = save_identity_sae(tmp_path / "identity", D, LAYER)
    proc = _evaluate(sae, cache, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][0]["reconstruction"]["subsets"]["all"]["log2_mse"] == "-inf"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "−inf" in md and "MSE is exactly 0 on subset(s) all" in md
    assert any("MSE is exactly 0" in w for w in report["warnings"])
