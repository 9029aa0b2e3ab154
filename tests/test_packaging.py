"""The project installs as one top-level package (plus the `pipeline.py` shim) and lives beside
Hugging Face's `evaluate`, whose import name our evaluation stage used to shadow."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.helpers import ROOT


def test_install_adds_one_top_level_package_and_the_shim() -> None:
    dist = distribution("fast-sae")
    top = dist.read_text("top_level.txt")
    if top is not None:  # wheel-style metadata
        assert set(top.split()) == {"fast_sae", "pipeline"}
    # editable installs record their mapping in the finder module instead
    finders = [f for f in dist.files or [] if "__editable__" in str(f) and str(f).endswith("finder.py")]
    for f in finders:
        text = Path(f.locate()).read_text()
        mapping = text.split("MAPPING", 1)[1].split("\n", 1)[0]
        assert "'fast_sae'" in mapping and "'pipeline'" in mapping
        for name in ("'train'", "'evaluate'", "'harvest'", "'actcache'", "'saeio'", "'demo'"):
            assert name not in mapping, f"{name} installed as a top-level module"


@pytest.mark.slow
def test_runs_beside_huggingface_evaluate(tmp_path: Path) -> None:
    code = ("import evaluate, fast_sae.evaluate, fast_sae.evaluate.runner\n"
            "assert hasattr(evaluate, 'load'), evaluate.__file__\n"
            "assert 'site-packages' in evaluate.__file__, evaluate.__file__\n"
            "print('ok')\n")
    # from the repository root (where a stray top-level evaluate/ folder would win) and from elsewhere
    for cwd in (ROOT, tmp_path):
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import evaluate; from fast_sae.cli import cli; "
                           "cli.main(['evaluate', '--help'], standalone_mode=False)"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--eval-cache" in proc.stdout, proc.stderr
