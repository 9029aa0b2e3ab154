"""torchrun with 2 CPU processes (gloo) trains the same SAEs as one process, each rank its own layers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fast_sae.train.config import SAESpec
from fast_sae.train.distributed import partition
from tests.helpers import run_train

ARGS = ["--layers", "3,7", "--architectures", "standard,topk", "--expansion-factors", "2", "--tokens", "4000",
        "--batch-tokens", "100", "--buffer-tokens", "1000", "--eval-sequences", "10", "--log-every", "10",
        "--k", "4", "--no-progress"]


def test_partition_keeps_layers_together_and_balances():
    specs = [SAESpec(layer, "standard", ef, 1.0) for layer in (1, 2, 3) for ef in (2, 4)]
    parts = partition(specs, 10, 2)
    assert sorted(s.name for p in parts for s in p) == sorted(s.name for s in specs)
    assert parts[0] and parts[1]
    assert {s.layer for s in parts[0]}.isdisjoint({s.layer for s in parts[1]})
    one_layer = [SAESpec(5, "topk", ef, 8) for ef in (2, 2 * 2, 8)]
    halves = partition(one_layer, 10, 2)
    assert halves[0] and halves[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(small_cache, tmp_path):
    run_train(str(small_cache), "--out", str(tmp_path / "one"), *ARGS, timeout=300)
    multi = run_train(str(small_cache), "--out", str(tmp_path / "two"), *ARGS, nproc=2, workdir=tmp_path, timeout=300)
    assert "[rank 0] 2 SAEs on layers [3]" in multi.stdout and "[rank 1] 2 SAEs on layers [7]" in multi.stdout
    for name in ("L3_standard_x2_l1_5", "L3_topk_x2_k4", "L7_standard_x2_l1_5", "L7_topk_x2_k4"):
        a = load_file(str(tmp_path / "one" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "sae_weights.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert (tmp_path / "one" / "metrics.jsonl").read_text() == (tmp_path / "two" / "metrics.jsonl").read_text()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [r["sae"] for r in summary["saes"]] == ["L3_standard_x2_l1_5", "L3_topk_x2_k4", "L7_standard_x2_l1_5",
                                                   "L7_topk_x2_k4"]
