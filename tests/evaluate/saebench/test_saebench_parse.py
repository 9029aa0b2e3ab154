"""evaluate --saebench without SAEBench itself: the option, its refusals, the vocabulary sample, the layer
cut-off rule, and SAEBench's output JSON reduced into report rows, report.md and compare's matched L0.

data/absorption_eval_results.json is the real output of SAEBench 0.6.0's absorption eval (a random
SAE at layer 3 of the embedded model, a 336-word sample); data/absorption_k_sparse_probing.json is
its k-sparse probing artifact with only the columns read here (letter, f1_probe).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.saebench.config import EVALS, SAEBenchConfig, _evals
from fast_sae.evaluate.saebench.results import summarise
from fast_sae.evaluate.saebench.tables import compare_lines, matched_saebench, report_lines
from fast_sae.evaluate.saebench.tl_model import last_block
from fast_sae.evaluate.saebench.worker import vocab_sample
from tests.evaluate.helpers import make_cache, save_random_sae
from tests.helpers import run_cli

DATA = Path(__file__).parent / "data"


def test_option_parses_names_and_refuses_unknown_ones() -> None:
    assert _evals("absorption, core") == ["absorption", "core"]
    assert _evals("all") == list(EVALS)
    with pytest.raises(EvalError, match=r"--saebench: unknown evaluation\(s\) 'scr'.*absorption, core"):
        _evals("absorption,scr")
    with pytest.raises(EvalError, match="--saebench-probe-ks"):
        SAEBenchConfig(evals=["sparse_probing_sae_probes"], probe_ks=[0]).check()
    with pytest.raises(EvalError, match="no SAEBench venv.*setup_saebench.sh"):
        SAEBenchConfig(evals=["absorption"], venv=Path("/nonexistent/venv")).venv_python()


@pytest.mark.slow  # the CLI in a subprocess
def test_cli_refuses_a_missing_venv_before_any_long_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = make_cache(tmp_path / "cache", {3: rng.normal(size=(40, 16)).astype(np.float32)}, [20, 20])
    sae = save_random_sae(tmp_path / "sae", 16, 32, 3)
    proc = run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(cache), "--out", str(tmp_path / "ev"),
                   "--saebench", "absorption", "--saebench-venv", str(tmp_path / "nowhere"), "--no-plots",
                   timeout=300, check=False)
    assert proc.returncode == 1
    assert f"Error: {tmp_path / 'nowhere'}: no SAEBench venv" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ev" / "report.json").exists()
    proc = run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(cache), "--out", str(tmp_path / "ev"),
                   "--saebench", "ravel", timeout=300, check=False)
    assert proc.returncode != 0 and "unknown evaluation(s) 'ravel'" in proc.stderr


def test_vocabulary_sample_is_seeded_and_keeps_every_letter() -> None:
    words = [f"{c}{i}x" for c in "abcdefghijklmnopqrstuvwxyz" for i in range(200 if c in "st" else 8)]
    words = ["".join(ch for ch in w if ch.isalpha()) + "a" * (i % 3) for i, w in enumerate(words)]
    a, b = vocab_sample(words, 100, 1), vocab_sample(words, 100, 1)
    assert a == b and a != vocab_sample(words, 100, 2)
    firsts = {w[0] for w in a}
    assert firsts == set("abcdefghijklmnopqrstuvwxyz")  # every letter, even at 100 of 1,000 words
    assert all(sum(w[0] == c for w in a) >= 5 for c in firsts)
    assert sum(w[0] == "s" for w in a) > 5 * sum(w[0] == "b" for w in a) / 5  # big letters keep their share
    assert vocab_sample(words, 0, 1) == words and set(a) <= set(words)


def test_layer_cut_off_applies_only_to_plain_hook_lists() -> None:
    assert last_block(["blocks.3.hook_resid_post"]) == 3
    assert last_block("blocks.12.attn.hook_z") == 12
    assert last_block(["hook_embed", "blocks.0.hook_resid_pre", "blocks.5.hook_resid_post"]) == 5
    assert last_block(["ln_final.hook_normalized"]) is None  # after the blocks: never cut
    assert last_block(lambda name: True) is None and last_block(None) is None and last_block([]) is None


def _entries(names: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=n) for n in names]


def test_absorption_output_reduced_into_rows_and_report(tmp_path: Path) -> None:
    work = tmp_path / "saebench"
    (work / "absorption").mkdir(parents=True)
    (work / "artifacts" / "absorption").mkdir(parents=True)
    shutil.copy(DATA / "absorption_eval_results.json", work / "absorption" / "sae0_custom_sae_eval_results.json")
    shutil.copy(DATA / "absorption_k_sparse_probing.json",
                work / "artifacts" / "absorption" / "sae1_custom_sae_k_sparse_probing.json")
    (work / "worker_result.json").write_text(json.dumps({"evals": {"absorption": {"saes": {}}}, "saes": {}}))
    per_sae, warnings = summarise(work, _entries(["ok", "too-few"]), ["absorption", "core"])  # type: ignore[arg-type]
    got = per_sae["ok"]["absorption"]
    doc = json.loads((DATA / "absorption_eval_results.json").read_text())
    assert got["mean_full_absorption"] == doc["eval_result_metrics"]["mean"]["mean_full_absorption_score"]
    assert got["letters"] == ["a", "j", "w", "x", "y", "z"] and got["n_letters"] == 6
    # the SAE without a result file: why, from the probe artifact (6 letters have F1 > 0.6 in it)
    assert per_sae["too-few"]["absorption"]["error"].startswith("6 of 26 letters passed the probe check")
    assert per_sae["ok"]["core"]["error"] == "not run: the worker stopped before it"
    assert any("core: the worker did not finish it" in w for w in warnings)
    rows = [{"name": n, "eval_regime": "fast", "saebench": per_sae[n],
             "reconstruction": {"subsets_no_prefix": {"all": {"l0": 8.0}}}} for n in per_sae]
    md = "\n".join(report_lines(rows, {"model": "m", "absorption": {"vocab_size": 336, "seed": 42, "min_letters": 1,
                                                                      "max_k": 10, "k_sparse_probe_epochs": 50}}))
    assert "## SAEBench" in md and "336 words" in md and "not comparable" not in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| ok |"))
    assert f"{got['mean_full_absorption']:.4f}" in line and "| 6 |" in line
    assert "6 of 26 letters passed" in md


def test_compare_matches_regimes_at_equal_l0() -> None:
    def row(regime: str, l0: float, absorption: float) -> dict:
        return {"regime": regime, "reconstruction": {"subsets_no_prefix": {"all": {"l0": l0}}},
                "saebench": {"absorption": {"mean_absorption_fraction": absorption, "sd_absorption_fraction": 0.1,
                                            "n_letters": 16}}}  # SE 0.025

    by_regime = {"fast": [row("fast", 16, 0.10), row("fast", 64, 0.30)],
                 "bt-p": [row("bt-p", 16, 0.20), row("bt-p", 64, 0.20)]}
    table = matched_saebench(by_regime)
    assert [m["metric"] for m in table] == ["absorption (mean fraction)"]
    m = table[0]
    assert m["l0"][0] == pytest.approx(16) and m["l0"][-1] == pytest.approx(64)
    assert m["values"]["fast"][0] == pytest.approx(0.10) and m["best"][0] == "fast"  # lower absorption is better
    assert m["best"][-1] == "bt-p" and m["se"] == pytest.approx(0.025)
    by_regime["bt-p"][0]["saebench"]["absorption"]["mean_absorption_fraction"] = 0.12  # a lead of 0.02 < SE
    assert matched_saebench(by_regime)[0]["best"][0] is None
    md = "\n".join(compare_lines({"regimes": {"fast": [], "bt-p": []}, "saebench": table}))
    assert "### SAEBench at matched L0" in md and "| absorption (mean fraction) | 16.0" in md


def test_compare_joins_saebench_results_of_separate_evaluations(tmp_path: Path) -> None:
    from fast_sae.evaluate.compare import load_rows
    from fast_sae.evaluate.report import new_report, write_report

    def report(folder: str, saebench: dict) -> Path:
        rep = new_report(["x"], {})
        rep["rows"] = [{"name": "s", "path": "/sae", "eval_cache": "/c", "saebench": saebench}]
        write_report(rep, tmp_path / folder)
        return tmp_path / folder

    first = report("a", {"absorption": {"mean_absorption_fraction": 0.3}, "core": {"error": "not run"}})
    second = report("b", {"core": {"ce_loss_score": 0.9}, "absorption": {"mean_absorption_fraction": 0.5}})
    rows = load_rows([first, second])
    assert len(rows) == 1  # one SAE on one eval cache
    assert rows[0]["saebench"] == {"absorption": {"mean_absorption_fraction": 0.3}, "core": {"ce_loss_score": 0.9}}
