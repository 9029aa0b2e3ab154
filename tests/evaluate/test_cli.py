"""`pipeline.py evaluate` / `compare` end to end on the embedded model, and their one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fast_sae.actcache import ActivationCache
from fast_sae.evaluate.cli import compare_cmd, evaluate_cmd
from fast_sae.evaluate.config import EvalConfig, InterventionSettings
from fast_sae.evaluate.downstream import DownstreamConfig
from fast_sae.evaluate.interpret import JudgeConfig
from fast_sae.evaluate.runner import run_evaluation

from .helpers import save_identity_sae, save_pca_sae

ROOT = Path(__file__).resolve().parents[2]
LAYER = 2


def _pca_run(folder: Path, cache_path: Path, regime: str) -> Path:
    cache = ActivationCache.open(cache_path)
    save_pca_sae(folder / f"pca_L{LAYER}", cache.read(LAYER, 0, cache.n_tokens), LAYER, 16, regime=regime,
                 model_name=cache.meta.model_id)
    return folder


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_cache, btp_cache):
    tmp = tmp_path_factory.mktemp("cli")
    return _pca_run(tmp / "run_fast", fast_cache, "fast"), _pca_run(tmp / "run_btp", btp_cache, "bt-p")


@pytest.mark.slow
def test_evaluate_and_compare_end_to_end(tmp_path, runs, fast_cache):
    run_fast, run_btp = runs
    out = tmp_path / "eval"
    proc = _pipeline("evaluate", "--sae", run_fast, "--sae", run_btp, "--eval-cache", fast_cache, "--out", out,
                     "--downstream-sequences", "1", "--downstream-tokens", "64", "--downstream-max-len", "40",
                     "--interpret", "--no-judge", "--n-features", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| SAE | trained | eval on |" in proc.stdout and "2 SAE evaluation(s)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = {r["regime"]: r for r in report["rows"]}
    assert set(rows) == {"fast", "bt-p"} and all(r["eval_regime"] == "fast" for r in rows.values())
    for r in rows.values():
        rec = r["reconstruction"]["subsets"]
        assert rec["all"]["n_tokens"] == ActivationCache.open(fast_cache).n_tokens
        assert rec["special"]["n_tokens"] > 0 and rec["user"]["n_tokens"] > 0 and rec["assistant"]["n_tokens"] > 0
        assert 0 < rec["all"]["explained_variance"] < 1 and rec["all"]["l0"] > 0
        ds = r["downstream"]
        assert ds["n_tokens"] == 39 and ds["zero_loss"] > ds["clean_loss"] > 0
        assert ds["cache_match_rel_err"] < 1e-2  # the hook sees what the harvest stored (layer indexing)
        assert Path(r["interpretability"]["files"]["dashboard"]).is_file()
    # FAST-fitted dictionary reconstructs chat special tokens better than one fitted on plain text
    assert rows["fast"]["reconstruction"]["subsets"]["special"]["mse"] < \
        rows["bt-p"]["reconstruction"]["subsets"]["special"]["mse"]
    assert rows["fast"]["downstream"]["clean_loss"] == rows["bt-p"]["downstream"]["clean_loss"]
    assert (out / "report.md").read_text().count("| run_") >= 4
    assert {"mse_l0_frontier", "mse_by_regime", "feature_density"} <= set(report["plots"])

    cmp = _pipeline("compare", out, "--out", tmp_path / "cmp")
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    assert "| tokens | metric | L0 | fast | bt-p |" in cmp.stdout and (tmp_path / "cmp" / "compare.md").is_file()


@pytest.mark.slow
def test_missing_sae_is_one_line_error(tmp_path, fast_cache):
    proc = _pipeline("evaluate", "--sae", tmp_path / "nope", "--cache", fast_cache, "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nope'}: no such SAE checkpoint or run folder"]


@pytest.mark.parametrize("case, message", [
    ("layer", "hook_layer 3 not in cache"),
    ("d_model", "does not match d_model 576"),
    ("cache", "no such cache folder"),
    ("not_sae", "not a folder"),
    ("range", "--eval-range"),
    ("no_cache", "no cache"),
    ("no_model", "--no-downstream"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, fast_cache, case, message):
    sae = save_identity_sae(tmp_path / "sae", 576 if case != "d_model" else 8, 3 if case == "layer" else LAYER)
    cache = tmp_path / "missing" if case == "cache" else fast_cache
    args = ["--sae", str(sae), "--out", str(tmp_path / "o"), "--no-progress"]
    if case == "no_model":
        args += ["--model", "embedded:other-model"]
    else:
        args += ["--no-downstream"]
    if case == "not_sae":
        (tmp_path / "file.txt").write_text("x")
        args[1] = str(tmp_path / "file.txt")
    if case != "no_cache":
        args += ["--cache", str(cache)]
    if case == "range":
        args += ["--eval-range", "5-9"]
    result = CliRunner().invoke(evaluate_cmd, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1] and "Traceback" not in result.output
    # input errors come before any pass over the data; at most the model-loading notice precedes them
    assert len(lines) == (2 if case == "no_model" else 1), lines


def test_compare_without_report_is_an_error(tmp_path):
    result = CliRunner().invoke(compare_cmd, [str(tmp_path)])
    assert result.exit_code == 1 and "no report.json" in result.output


@pytest.mark.slow
def test_intervention_is_wired_into_the_report(tmp_path, runs, fast_cache, embedded_model):
    run_fast, _ = runs
    model_id = ActivationCache.open(fast_cache).meta.model_id
    report = run_evaluation(EvalConfig(
        saes=[run_fast], caches=[fast_cache], out=tmp_path / "o", downstream=DownstreamConfig(enabled=False),
        progress=False, max_eval_tokens=500,
        intervention=InterventionSettings(enabled=True, alphas=(0, 50), max_new_tokens=3, prompts=["Say hello."],
                                          conversations=3, reply_tokens=4, random_directions=1, matched_features=1),
        judge=JudgeConfig(calibrate=False, max_new_tokens=4, retries=0)),  # calibration: tests/evaluate/interpret
        log=lambda _m: None, models={model_id: embedded_model})
    iv = report["rows"][0]["intervention"]
    assert iv["likelihood"]["alpha0_identical"] and [r["alpha"] for r in iv["likelihood"]["rows"]] == [0.0, 50.0]
    assert [r["alpha"] for r in iv["rows"]] == [0.0, 50.0]
    assert iv["rows"][0]["n_identical_to_unmodified"] == 1  # alpha 0 leaves generation unchanged
    assert Path(iv["files"]["json"]).is_file()
    assert "## Special-token intervention" in (tmp_path / "o" / "report.md").read_text()
