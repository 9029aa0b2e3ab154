"""`pipeline.py demo` end to end on small sizes: held-out conversations in no training cache, one shared
normalisation, a matched-L0 comparison with frontier plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache

from .helpers import run_cli


@pytest.mark.slow
def test_demo_small_holds_out_documents_and_compares_at_matched_l0(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--tokens", "1500", "--eval-tokens", "800", "--holdout-fraction", "0.2",
                   "--layer", "2", "--context-size", "128", "--architectures", "topk,standard",
                   "--expansion-factor", "1", "--k", "4,8", "--l1-coefficients", "1,5", "--train-tokens", "2048",
                   "--batch-tokens", "256", "--downstream-sequences", "1", "--no-interpret", timeout=1800)
    caches = {name: ActivationCache.open(out / "caches" / name) for name in ("fast-eval", "fast", "bt-f", "bt-p")}
    held = set(np.unique(caches["fast-eval"].doc_ids()).tolist())
    assert held and caches["fast-eval"].meta.harvest_args["docs"] == "holdout"
    for name in ("fast", "bt-f"):  # the same chat corpus: disjoint documents
        assert held.isdisjoint(np.unique(caches[name].doc_ids()).tolist()), name
    assert caches["bt-p"].meta.dataset != caches["fast-eval"].meta.dataset
    assert "held-out check: none of the" in proc.stdout
    factors = set()
    for cfg_file in (out / "runs").glob("*/*/cfg.json"):
        norm = json.loads(cfg_file.read_text())["metadata"]["fast_sae"]["normalization"]
        assert Path(norm["source"]["path"]) == (out / "caches" / "fast").resolve()
        factors.add(norm["factor"])
    assert len(factors) == 1  # one constant for every regime
    report = json.loads((out / "eval" / "report.json").read_text())
    assert len(report["rows"]) == 12 and {r["training_overlap"]["status"] for r in report["rows"]} == \
        {"disjoint", "other dataset"}
    md = (out / "compare" / "compare.md").read_text()
    assert "### At matched L0" in md and "★ no prefix" in md and "all tokens" in md
    assert list((out / "compare").glob("frontier_*.png")) and list((out / "compare").glob("curves_*.png"))
