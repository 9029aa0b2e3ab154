"""Chat-structure probes: a label planted in one residual direction is found by one latent, a label
with no signal scores chance, the split is by document, and `pipeline.py evaluate` reports them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache, Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.evaluate.logistic import accuracies, fit_logistic
from fast_sae.evaluate.probe_labels import balance_per_token, build_tasks, split_documents
from fast_sae.evaluate.probes import ProbeConfig, probe_layer
from fast_sae.evaluate.sources import EvalSelection
from fast_sae.saeio import load_sae, save_sae
from tests.helpers import run_cli

from .helpers import chat_stream, sae_cfg

D, D_SAE, LAYER = 16, 32, 3


def _direction(seed: int = 7) -> np.ndarray:
    u = np.random.default_rng(seed).standard_normal(D)
    return u / np.linalg.norm(u)


def planted_cache(path: Path, n_docs: int = 60, seed: int = 0, **kw) -> tuple[Path, dict[str, np.ndarray]]:
    """Gaussian residuals with the user/assistant label planted along one unit direction u:
    x = noise + 3u on user content, noise − 3u on assistant content; nothing else carries a label."""
    s = chat_stream(n_docs, seed=seed)
    rng = np.random.default_rng(seed + 1)
    acts = rng.standard_normal((len(s["ids"]), D)).astype(np.float32)
    sign = np.where(s["roles"] == int(Role.USER), 3.0, np.where(s["roles"] == int(Role.ASSISTANT), -3.0, 0.0))
    acts += (sign[:, None] * _direction()[None, :]).astype(np.float32)
    write_cache_from_arrays(path, {LAYER: acts}, seq_starts=s["starts"], token_ids=s["ids"], roles=s["roles"],
                            chunk_tokens=256, **kw)
    return path, s


def aligned_sae(folder: Path, latent: int = 5) -> Path:
    """A ReLU SAE whose latent ``latent`` reads exactly u (bias 0); the others are random unit directions
    with bias −1."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(D, D_SAE, generator=g)
    w = w / w.norm(dim=0, keepdim=True)
    w[:, latent] = torch.from_numpy(_direction()).float()
    b = torch.full((D_SAE,), -1.0)
    b[latent] = 0.0
    weights = {"W_enc": w, "W_dec": w.T.contiguous(), "b_enc": b, "b_dec": torch.zeros(D)}
    return save_sae(folder, weights, sae_cfg(D, D_SAE, LAYER, model_name="synthetic"))


def _all(cache: ActivationCache) -> EvalSelection:
    starts = cache.seq_starts()
    return EvalSelection(sequences=np.arange(len(starts) - 1), seq_starts=starts, note="all")


def test_planted_label_is_found_by_one_latent_and_control_is_chance(tmp_path):
    path, _ = planted_cache(tmp_path / "cache", n_docs=40)
    cache = ActivationCache.open(path)
    sae = load_sae(aligned_sae(tmp_path / "sae", latent=5))
    res = probe_layer({"sae": sae}, cache, LAYER, _all(cache), ProbeConfig(progress=False))["sae"]
    ua = res["labels"]["user_vs_assistant"]
    assert ua["tasks"][0]["k"]["1"]["latents"] == [5]  # the aligned latent, chosen by class-mean difference
    assert ua["k"]["1"]["balanced_accuracy"] > 0.97 and ua["dense"]["balanced_accuracy"] > 0.97
    # balanced per token id in each split: as many user as assistant tokens
    task = ua["tasks"][0]
    assert task["n_test_positive"] * 2 == task["n_test"] and task["n_train_positive"] * 2 == task["n_train"]
    # the control label carries no signal: chance at every k, and for the dense probe
    rs = res["labels"]["reply_start"]
    assert rs["skipped"] is None and rs["tasks"][0]["n_test_positive"] >= 10
    for k in ("1", "2", "5", "20"):
        assert 0.35 < rs["k"][k]["balanced_accuracy"] < 0.65, (k, rs["k"][k])
    assert 0.35 < rs["dense"]["balanced_accuracy"] < 0.65
    sp = res["labels"]["special_token"]
    assert {c["token_id"] for c in sp["classes"] if c["probed"]} >= {1, 2, 3, 4, 198}
    assert res["split"]["n_docs"] == 40 and res["split"]["n_test_docs"] == 12
    assert ua["l0"] > 0 and res["n_fits_not_converged"] == 0


def test_probe_tokens_are_star_tokens_split_by_document(tmp_path):
    """BT-like blocks that cut conversations apart: no document has tokens in train and test, and no
    probe token lies at position 0 or in the shared prefix."""
    s = chat_stream(30, seed=4)
    n = len(s["ids"])
    starts = np.r_[np.arange(0, n, 48), n]  # blocks of 48 tokens: conversations span blocks
    acts = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    path = write_cache_from_arrays(tmp_path / "c", {LAYER: acts}, seq_starts=starts, token_ids=s["ids"],
                                   roles=s["roles"], doc_ids=s["doc_ids"], chunk_tokens=128, regime="bt-f")
    cache = ActivationCache.open(path)
    data = build_tasks(cache, _all(cache), test_fraction=0.3, seed=1, min_class_tokens=2)
    docs, pos = cache.doc_ids()[data.rows], cache.positions()[data.rows]
    assert len(data.tasks) >= 3
    spanning = [d for d in np.unique(s["doc_ids"]) if len(np.unique(np.searchsorted(starts, np.flatnonzero(
        s["doc_ids"] == d), side="right"))) > 1]
    assert spanning  # the test means something: documents cross block boundaries
    for t in data.tasks:
        assert not set(docs[t.train]) & set(docs[t.test]), t.name
        assert len(np.unique(docs[t.test])) == t.n_test_docs
    assert (pos > 0).all()  # no block's first token (the sink)
    assert data.split["n_test_docs"] == 9
    # the split is seeded: the same seed gives the same documents, another seed others
    again = build_tasks(cache, _all(cache), test_fraction=0.3, seed=1, min_class_tokens=2)
    other = build_tasks(cache, _all(cache), test_fraction=0.3, seed=2, min_class_tokens=2)
    def test_docs(d):
        return [set(cache.doc_ids()[d.rows][t.test]) for t in d.tasks]

    assert test_docs(again) == test_docs(data) and test_docs(other)[0] != test_docs(data)[0]


def test_fast_shared_prefix_is_left_out(tmp_path):
    path, s = planted_cache(tmp_path / "cache", n_docs=20)
    cache = ActivationCache.open(path)
    data = build_tasks(cache, _all(cache), min_class_tokens=2)
    # every conversation opens with the system block and "<|im_start|>user\n": 13 shared tokens
    assert data.split["shared_prefix_length"] == 13
    assert (cache.positions()[data.rows] >= 13).all()


def test_split_and_balance_helpers():
    docs = np.repeat(np.arange(10), 5)
    mask, test_docs = split_documents(docs, 0.3, seed=0)
    assert len(test_docs) == 3 and mask.sum() == 15 and set(docs[mask]) == set(test_docs)
    assert split_documents(np.zeros(4, np.int64), 0.3, 0)[1].size == 0  # one document: no split
    assert len(split_documents(np.arange(2), 0.99, 0)[1]) == 1  # never every document
    ids = np.array([7, 7, 7, 8, 8, 9])
    positive = np.array([True, True, False, True, False, True])
    chosen = balance_per_token(np.arange(6), ids, positive, np.random.default_rng(0))
    assert sorted(ids[chosen].tolist()) == [7, 7, 8, 8]  # id 9 is user-only: dropped
    assert positive[chosen].sum() == 2


def test_logistic_regression_separates_and_is_balanced():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = x[:, 0] * 100 + 50 > 0  # a scaled feature: standardisation makes it as easy as any other
    probe = fit_logistic(x, y)
    acc, bacc = accuracies(y, probe.predict(x))
    assert acc > 0.95 and bacc > 0.95 and probe.converged
    assert fit_logistic(x, y).coef.tolist() == probe.coef.tolist()  # deterministic
    # unbalanced classes, no signal: the class weights keep the probe from predicting the majority
    y_rare = torch.arange(400) % 10 == 0
    _, b = accuracies(y_rare, fit_logistic(torch.randn(400, 2, generator=g), y_rare).predict(x[:, :2]))
    assert 0.3 < b < 0.7
    assert accuracies(torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False])) == \
        (0.75, (1.0 + 2 / 3) / 2)


@pytest.mark.slow
def test_evaluate_cli_reports_probes(tmp_path):
    path, _ = planted_cache(tmp_path / "cache")
    sae = aligned_sae(tmp_path / "run" / "aligned_sae")
    out = tmp_path / "eval"
    run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(path), "--out", str(out), "--no-downstream",
            "--no-plots", "--no-progress", "--probe-k", "1,5")
    report = json.loads((out / "report.json").read_text())
    probes = report["rows"][0]["probes"]
    assert probes["k"] == [1, 5] and probes["token_filter"] == "no_prefix"
    assert probes["labels"]["user_vs_assistant"]["k"]["1"]["balanced_accuracy"] > 0.97
    assert report["settings"]["probes"]["k"] == [1, 5]
    md = (out / "report.md").read_text()
    assert "## Chat-structure probes" in md and "user_vs_assistant" in md
    off = run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(path), "--out", str(tmp_path / "e2"),
                  "--no-downstream", "--no-plots", "--no-progress", "--no-probes")
    assert json.loads((tmp_path / "e2" / "report.json").read_text())["rows"][0]["probes"] is None
    assert off.returncode == 0
    bad = run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(path), "--out", str(tmp_path / "e3"),
                  "--no-downstream", "--probe-k", "0", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: --probe-k")


def _probe_row(regime: str, l0: float, acc: float) -> dict:
    labels = {"user_vs_assistant": {"l0": l0, "k": {"1": {"balanced_accuracy": acc}, "5": {"balanced_accuracy": 0.9}},
                                    "dense": {"balanced_accuracy": 0.95}, "se": 0.05}}
    return {"name": f"{regime}_{l0:g}", "path": f"/runs/{regime}/L1_topk_x2_k{int(l0)}", "regime": regime,
            "layer": 1, "architecture": "topk", "d_sae": 8, "eval_regime": "fast", "eval_cache": "/c",
            "model_name": "m", "reconstruction": {}, "probes": {"k": [1, 5], "labels": labels}}


def test_compare_matches_probe_accuracy_at_l0_by_hand():
    from fast_sae.evaluate.compare import comparison, render_markdown

    rows = [_probe_row("fast", 10, 0.70), _probe_row("fast", 40, 0.90),
            _probe_row("bt-f", 20, 0.60), _probe_row("bt-f", 80, 0.80)]
    (g,) = comparison(rows)
    m = next(p for p in g["probes"] if p["label"] == "user_vs_assistant" and p["k"] == 1)
    assert m["ranges"] == {"fast": [10, 40], "bt-f": [20, 80]} and m["l0"][0] == pytest.approx(20)
    # at L0 = 20, halfway between ln 10 and ln 40: FAST 0.80; BT(F) 0.60 (its own point)
    assert m["values"]["fast"][0] == pytest.approx(0.80) and m["values"]["bt-f"][0] == pytest.approx(0.60)
    # a lead counts only beyond the SE (0.05): at L0 = 20 FAST leads by 0.20; at L0 = 40 FAST 0.90 vs BT(F)
    # 0.60 + 0.20 · ln(2)/ln(4) = 0.70
    assert m["best"] == ["fast"] * 4 and m["dense"] == 0.95 and m["se"] == 0.05
    five = next(p for p in g["probes"] if p["k"] == 5)
    assert five["best"] == [None] * 4  # equal everywhere: nobody ahead
    close = comparison([_probe_row("fast", 10, 0.70), _probe_row("fast", 40, 0.74),
                        _probe_row("bt-f", 10, 0.68), _probe_row("bt-f", 40, 0.70)])[0]
    assert next(p for p in close["probes"] if p["k"] == 1)["best"] == [None] * 4  # leads of 0.02-0.04 < SE
    md = render_markdown([g])
    assert "### Chat-structure probes at matched L0" in md
    assert "| user_vs_assistant | 1 | 20.0 · 25.2 · 31.7 · 40.0 | 0.800 · " in md
    assert "| fast 4/4 | 0.050 | 0.950 |" in md
    assert "| user_vs_assistant | 5 |" in md and "| none | 0.050 | 0.950 |" in md
    # no probes in the rows (an older report, or --no-probes): no section
    plain = [{k: v for k, v in r.items() if k != "probes"} for r in rows]
    assert "Chat-structure probes" not in render_markdown(comparison(plain))


def test_plain_text_cache_skips_every_label_with_the_reason(tmp_path):
    """BT(P) eval data has no chat roles: nothing to probe, said per label, nothing crashes."""
    acts = np.random.default_rng(0).standard_normal((200, D)).astype(np.float32)
    path = write_cache_from_arrays(tmp_path / "c", {LAYER: acts}, seq_starts=np.arange(0, 201, 50), regime="bt-p")
    cache = ActivationCache.open(path)
    res = probe_layer({"s": load_sae(aligned_sae(tmp_path / "s"))}, cache, LAYER, _all(cache),
                      ProbeConfig(progress=False))["s"]
    for label in ("user_vs_assistant", "special_token", "reply_start"):
        e = res["labels"][label]
        assert e["n_tasks"] == 0 and e["skipped"] and e["k"] == {} and e["l0"] is None
    one = write_cache_from_arrays(tmp_path / "one", {LAYER: acts[:50]}, regime="fast")  # a single document
    one_cache = ActivationCache.open(one)
    res = probe_layer({"s": load_sae(aligned_sae(tmp_path / "s2"))}, one_cache, LAYER, _all(one_cache),
                      ProbeConfig(progress=False))["s"]
    assert "a by-document split needs 2" in res["labels"]["reply_start"]["skipped"]
