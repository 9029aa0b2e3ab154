"""report.json / report.md / plots from a model-free evaluation, and compare on its output."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fast_sae.actcache import Role
from fast_sae.evaluate.compare import run_compare
from fast_sae.evaluate.config import EvalConfig
from fast_sae.evaluate.downstream import DownstreamConfig
from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.reconstruction import ReconstructionConfig
from fast_sae.evaluate.report import fmt, markdown_table, read_report
from fast_sae.evaluate.runner import run_evaluation

from .helpers import make_cache, save_constant_sae, save_pca_sae


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    rng = np.random.default_rng(0)
    n, d = 60, 8
    roles = np.where(np.arange(n) % 5 == 0, int(Role.SPECIAL), int(Role.USER)).astype(np.uint8)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[roles == int(Role.SPECIAL)] = x[roles == int(Role.SPECIAL)] * 0.1 + 20.0  # high-norm special tokens
    cache = make_cache(tmp / "cache", {3: x}, [10, 20, 30], roles=roles, regime="fast", model_id="m")
    save_pca_sae(tmp / "fast_run" / "pca", x, 3, 3, regime="fast", model_name="m")
    save_pca_sae(tmp / "btp_run" / "pca", x[roles != int(Role.SPECIAL)], 3, 3, regime="bt-p", model_name="m")
    save_constant_sae(tmp / "btp_run" / "mean", d, 3, x.mean(0), regime="bt-p", model_name="m")
    out = tmp / "eval"
    report = run_evaluation(EvalConfig(saes=[tmp / "fast_run", tmp / "btp_run"], caches=[cache], out=out,
                                       reconstruction=ReconstructionConfig(batch_tokens=7),
                                       downstream=DownstreamConfig(enabled=False), progress=False), log=lambda _m: None)
    return report, out


@pytest.mark.slow
def test_report_files(evaluated):
    report, out = evaluated
    assert [r["name"] for r in report["rows"]] == ["fast_run/pca", "mean", "btp_run/pca"]
    doc = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    by_name = {r["path"].split("/")[-2] + "/" + r["name"].split("/")[-1]: r for r in doc["rows"]}
    fast = by_name["fast_run/pca"]["reconstruction"]["subsets"]
    btp = by_name["btp_run/pca"]["reconstruction"]["subsets"]
    assert fast["special"]["mse"] < btp["special"]["mse"]  # fitted with special tokens in view
    ev = by_name["btp_run/mean"]["reconstruction"]["subsets"]["all"]["explained_variance"]
    assert ev == pytest.approx(0, abs=1e-5)
    assert by_name["btp_run/mean"]["reconstruction"]["dead_fraction"] == 1.0
    back = read_report(out)["rows"][0]["reconstruction"]["subsets"]["all"]
    assert back["mse"] == report["rows"][0]["reconstruction"]["subsets"]["all"]["mse"]
    md = (out / "report.md").read_text()
    assert "| SAE | trained | eval on |" in md and "log2 MSE_st ★" in md and "Headline (★)" in md
    assert "ΔCE" not in md.split("## By token filter")[0].split("\n|")[1]  # no downstream pass ran
    for name in ("mse_l0_frontier", "mse_by_regime", "feature_density"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "score_bands" not in report["plots"]  # no interpretability ran
    freq = np.load(report["rows"][0]["reconstruction"]["feature_frequency_file"])
    assert freq.shape == (6,) and (freq > 0).all()


@pytest.mark.slow
def test_compare_groups_and_matched_l0(evaluated, tmp_path):
    report, out = evaluated
    groups, md, files = run_compare([out], tmp_path / "cmp")
    assert len(groups) == 2  # d_sae 6 (the two PCA SAEs) and d_sae 4 (the mean SAE) are different groups
    pca = next(g for g in groups if g["key"][3] == 6)
    assert list(pca["regimes"]) == ["fast", "bt-p"]
    # one SAE per regime: each frontier is a single point at the same L0 (PCA: 2 of 2k features fire... per
    # sign) only if the L0s meet; the table says so either way, and never extrapolates
    for m in pca["matched"]:
        for regime, values in m["values"].items():
            lo, hi = m["ranges"][regime]
            assert all(v is None or lo <= x <= hi for x, v in zip(m["l0"], values))
    assert "FAST vs BT(F) vs BT(P)" in md and "### At matched L0" in md and "### Every SAE" in md
    assert any(n.startswith("Held-out check: not every SAE") for n in pca["notes"])  # PCA SAEs record nothing
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [g["key"] for g in doc["groups"]] == [g["key"] for g in groups]
    assert any(k.startswith("frontier_") for k in files)
    assert (tmp_path / "cmp" / "compare_mse.png").is_file()
    # the same report given twice is not counted twice
    groups2, _, _ = run_compare([out, out / "report.json"])
    assert [g["regimes"] for g in groups2] == [g["regimes"] for g in groups]


def test_read_report_errors(tmp_path):
    with pytest.raises(EvalError, match="no report.json"):
        read_report(tmp_path)
    from .helpers import save_identity_sae

    save_identity_sae(tmp_path / "run" / "sae", 2, 0)
    with pytest.raises(EvalError, match="a training run folder, not an evaluation"):
        read_report(tmp_path / "run")
    (tmp_path / "report.json").write_text('{"format": "other"}')
    with pytest.raises(EvalError, match="not an evaluation report"):
        read_report(tmp_path)


def test_cells():
    assert fmt(None, ".3f") == "–" and fmt(float("nan"), ".3f") == "nan" and fmt(float("-inf"), ".3f") == "−inf"
    assert fmt(0.1234, "%") == "12.3" and fmt(1.5, "+.2f") == "+1.50" and fmt(3.0, "d") == "3"
    table = markdown_table([{"a": 1.0, "b": None}], [("A", "a", ".1f"), ("B", "b", ".1f")])
    assert table.splitlines() == ["| A |", "|---|", "| 1.0 |"]  # all-empty column dropped


@pytest.mark.slow
def test_score_bands_plot_and_section(evaluated, tmp_path):
    """Judge results (as run_interpretability returns them) become a plot and a report section."""
    from fast_sae.evaluate.plots import write_plots
    from fast_sae.evaluate.report import render_markdown

    report, _ = evaluated
    rows = [dict(r) for r in report["rows"]]
    shares = [{"1": 0.5, "2": 0.25, "3": 0.0, "4": 0.25, "5": 0.0}, {"1": 0.0, "2": 0.0, "3": 0.5, "4": 0.0, "5": 0.5}]
    for r, share in zip(rows, shares):
        r["interpretability"] = {"scores": {"share": share, "top_range_share": share["4"] + share["5"],
                                            "mean_score": 2.0, "n_scored": 4},
                                 "files": {"dashboard": "d.html"}}
    plots = write_plots(rows, tmp_path / "plots")
    assert (tmp_path / "plots" / "score_bands.png").read_bytes()[:4] == b"\x89PNG" and "score_bands" in plots
    md = render_markdown({**report, "rows": rows})
    section = md.split("## Interpretability")[1]
    assert ("| SAE | eval on | score 1 | score 2 | score 3 | score 4 | score 5 | top band 4–5 | mean | scored |"
            in section)
    assert "| fast_run/pca | fast | 50.0 | 25.0 | 0.0 | 25.0 | 0.0 | 25.0 |" in section
    assert "not meaningful" not in md  # a judge not marked otherwise (e.g. a hosted one)
    rows[0]["interpretability"] = {"n_live": 6, "n_features_sampled": 4, "scores": None,
                                   "files": {"dashboard": "x.html"}}
    section = render_markdown({**report, "rows": rows[:1]}).split("## Interpretability")[1]
    assert "| fast_run/pca | fast | 6 |" in section and "x.html" in section  # without a judge
    assert "top band %" in md.split("## By token filter")[0]


@pytest.mark.slow
def test_every_sae_on_every_eval_cache(tmp_path):
    """Cross-regime scoring: each SAE gets one row per eval cache, told apart by the cache's regime."""
    rng = np.random.default_rng(5)
    chat = rng.normal(size=(30, 4)).astype(np.float32)
    text = rng.normal(size=(24, 4)).astype(np.float32) + 3
    roles = np.where(np.arange(30) % 3 == 0, int(Role.SPECIAL), int(Role.ASSISTANT)).astype(np.uint8)
    fast = make_cache(tmp_path / "fast", {1: chat}, [10, 20], roles=roles, regime="fast", model_id="m")
    btp = make_cache(tmp_path / "btp", {1: text}, [12, 12], regime="bt-p", model_id="m")
    save_pca_sae(tmp_path / "runs" / "a", text, 1, 2, regime="bt-p", model_name="m", cache_path=str(btp),
                 eval_sequence_range=[1, 2])
    report = run_evaluation(EvalConfig(saes=[tmp_path / "runs"], caches=[fast, btp], out=tmp_path / "o",
                                       downstream=DownstreamConfig(enabled=False), progress=False),
                            log=lambda _m: None)
    assert [r["row_id"] for r in report["rows"]] == ["a@fast", "a@bt-p"]
    on_fast, on_btp = report["rows"]
    assert on_fast["eval_tokens"] == 30  # not its training cache: every sequence
    assert on_btp["eval_tokens"] == 12  # its training cache: only the held-out sequence 1
    assert on_fast["reconstruction"]["subsets"]["special"]["n_tokens"] == 10
    assert on_btp["reconstruction"]["subsets"]["special"]["n_tokens"] == 0
    assert set(report["caches"]) == {str(fast), str(btp)}
    assert (tmp_path / "o" / "feature_frequency" / "a__bt-p.npy").is_file()
