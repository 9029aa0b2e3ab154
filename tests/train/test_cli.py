"""The train command: config files, one-line errors, and real harvested caches end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import load_sae
from fast_sae.train.cli import train_cmd

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--tokens", "3000", "--batch-tokens", "100", "--buffer-tokens", "1000", "--eval-sequences", "10",
         "--no-progress", "--expansion-factors", "2"]


def _invoke(args: list[str]):
    return CliRunner().invoke(train_cmd, [str(a) for a in args])


def _assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    assert pattern in last, last


def test_missing_cache(tmp_path):
    _assert_one_line_error(_invoke([tmp_path / "nope", "--out", tmp_path / "run"]), "no such cache folder")


def test_layer_not_in_cache(small_cache, tmp_path):
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--layers", "3,4", *SMALL]),
                           "layer 4 not in cache (layers: [3, 7])")


def test_d_model_mismatch_with_an_existing_run(small_cache, synthetic_cache, tmp_path):
    first = _invoke([small_cache, "--out", tmp_path / "run", "--layers", "3", *SMALL, "--stop-after-steps", "5"])
    assert first.exit_code == 0, first.output
    other, _ = synthetic_cache
    _assert_one_line_error(_invoke([other, "--out", tmp_path / "run", "--layers", "0", *SMALL]),
                           "d_model mismatch")


def test_changed_settings_refuse_to_resume(small_cache, tmp_path):
    assert _invoke([small_cache, "--out", tmp_path / "run", "--layers", "3", *SMALL,
                    "--stop-after-steps", "5"]).exit_code == 0
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--layers", "3", *SMALL, "--lr", "0.1"]),
                           "train lr")


def test_grid_that_cannot_fit(small_cache, tmp_path):
    result = _invoke([small_cache, "--out", tmp_path / "run", "--layers", "3,7", "--architectures", "standard,topk",
                      *SMALL, "--expansion-factors", "20000000"])
    _assert_one_line_error(result, "grid does not fit in memory")
    assert "memory estimate:" in result.output  # the estimate is printed before refusing
    assert not list((tmp_path / "run").glob("L*"))


def test_truncated_chunk(small_cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_cache, broken)
    chunk = ActivationCache.open(broken).chunk_file(7, 3)
    chunk.write_bytes(chunk.read_bytes()[:100])
    _assert_one_line_error(_invoke([broken, "--out", tmp_path / "run", "--layers", "7", *SMALL]),
                           "the cache is truncated or corrupt")


def test_bad_config_file(small_cache, tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text("[train]\nlearning_rate = 3\n")
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--config", cfg]),
                           "unknown [train] field 'learning_rate'")
    cfg.write_text('[train]\ntokens = "many"\n[grid]\nk = [32, 1.5]\n')
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--config", cfg]),
                           "grid.toml [train]: tokens: expected an integer, got 'many'")
    cfg.write_text('[grid.sparsity]\nstandard = [1.0]\n')
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--config", cfg]),
                           "[grid.sparsity] is now three [grid] lists")
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--architectures", "gated", *SMALL]),
                           "architecture 'gated'")
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--device", "tpu", *SMALL]),
                           "device 'tpu'")
    _assert_one_line_error(_invoke([small_cache, "--out", tmp_path / "run", "--tokens", "10", *SMALL[2:]]),
                           "smaller than one batch")


def test_yaml_config_with_command_line_override(small_cache, tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("train:\n  tokens: 2000\n  batch_tokens: 100\n  buffer_tokens: 1000\n  eval_sequences: 5\n"
                   "  lr: 0.001\ngrid:\n  layers: [7]\n  architectures: [topk, standard]\n"
                   "  expansion_factors: [2]\n  k: [4, 8]\n  l1_coefficients: 1.0\n")
    result = _invoke([small_cache, "--out", tmp_path / "run", "--config", cfg, "--tokens", "1000", "--no-progress"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if (p / "cfg.json").is_file())
    assert names == ["L7_standard_x2_l1_1", "L7_topk_x2_k4", "L7_topk_x2_k8"]
    assert load_sae(tmp_path / "run" / "L7_topk_x2_k8").cfg.run.training_tokens == 1000
    assert "L7_topk_x2_k8" in result.output  # the end-of-run table


@pytest.mark.slow
def test_real_cache_every_architecture_reduces_mse(fast_cache, tmp_path):
    result = _invoke([fast_cache, "--out", tmp_path / "run", "--layers", "5", "--architectures",
                      "standard,jumprelu,topk,batchtopk", "--expansion-factors", "1", "--tokens", "12800",
                      "--batch-tokens", "128", "--buffer-tokens", "1024", "--eval-sequences", "2", "--lr", "1e-3",
                      "--lr-end", "1e-4", "--l1-coefficients", "0.05", "--l0-coefficients", "0.05", "--k", "32",
                      "--log-every", "10", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for arch in ("standard", "jumprelu", "topk", "batchtopk"):
        train = [r for r in lines if r["architecture"] == arch and r["split"] == "train"]
        final = next(r for r in lines if r["architecture"] == arch and r["split"] == "eval")
        assert train[-1]["mse"] < 0.5 * train[0]["mse"], (arch, train[0]["mse"], train[-1]["mse"])
        assert final["explained_variance"] > 0.3, (arch, final)
        assert final["held_out"]


@pytest.mark.slow
def test_pipeline_train_subprocess(fast_cache, tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text('[train]\ntokens = 2560\nbatch_tokens = 128\nbuffer_tokens = 1024\neval_sequences = 2\n'
                   '[grid]\nlayers = [2, 5]\narchitectures = ["standard", "topk"]\nexpansion_factors = [1]\n'
                   'k = [16]\nl1_coefficients = [1.0]\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "pipeline.py", "train", str(fast_cache), "--out", str(tmp_path / "run"),
                           "--config", str(cfg), "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "memory estimate" in proc.stdout
    for name in ("L2_standard_x1_l1_1", "L2_topk_x1_k16", "L5_standard_x1_l1_1", "L5_topk_x1_k16"):
        sae = load_sae(tmp_path / "run" / name)
        assert sae.cfg.d_in == 576 and sae.cfg.model_name
        assert sae.cfg.regime == "fast"
    bad = subprocess.run([sys.executable, "pipeline.py", "train", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "r2")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_block_training_cache_trains_and_records_its_regime(btp_cache, tmp_path):
    result = _invoke([btp_cache, "--out", tmp_path / "run", "--layers", "2", "--architectures", "topk",
                      "--expansion-factors", "1", "--k", "16", "--tokens", "2560", "--batch-tokens", "128",
                      "--buffer-tokens", "512", "--eval-sequences", "2", "--lr", "1e-3", "--no-progress"])
    assert result.exit_code == 0, result.output
    sae = load_sae(tmp_path / "run" / "L2_topk_x1_k16")
    assert sae.cfg.regime == "bt-p" and sae.cfg.context_size == 128
    starts = ActivationCache.open(btp_cache).seq_starts()
    assert sae.cfg.training.eval_token_range == (int(starts[-3]), int(starts[-1]))
