"""The judge calibration: known cases from a real cache, a random judge fails, a correct judge passes, and the
result (not the backend's name) decides whether report and compare call judge scores meaningful."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, Role
from fast_sae.evaluate.compare import run_compare
from fast_sae.evaluate.config import EvalConfig, InterpretSettings
from fast_sae.evaluate.downstream import DownstreamConfig
from fast_sae.evaluate.interpret import JudgeConfig
from fast_sae.evaluate.interpret.calibration import auc, build_cases, calibrate
from fast_sae.evaluate.interpret.judge import ReplyCache
from fast_sae.evaluate.interpret.judge_backends import OpenAIBackend
from fast_sae.evaluate.runner import run_evaluation
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer

from ..helpers import save_pca_sae
from ..http_servers import JudgeServer, oracle_judge, random_judge
from .conftest import CHAT_PREFIX


def test_auc_by_hand():
    assert auc([5, 4], [1, 2]) == 1.0 and auc([1, 2], [5, 4]) == 0.0
    assert auc([3, 3], [3, 3]) == 0.5 and auc([5, 3], [3, 1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert auc([], [1]) is None


def test_cases_are_what_they_claim(chat_cache):
    cache = ActivationCache.open(chat_cache[0])
    n_prefix = 1 + len(load_tokenizer(EMBEDDED_MODEL)(CHAT_PREFIX, add_special_tokens=False)["input_ids"])
    cases = build_cases(cache, cases=4, top_n=5, window=6, seed=3, prefix_length=n_prefix)
    ids, roles = cache.token_ids(), cache.roles()
    planted = [c for c in cases if c.kind == "planted"]
    assert [c.kind for c in cases].count("random") == 4 and len({c.token_id for c in planted}) == len(planted) == 4
    for c in planted:
        assert len(c.contexts) == 5 and len({ctx["sequence"] for ctx in c.contexts}) == 5  # distinct contexts
        for ctx in c.contexts:
            idx = ctx["token_index"] - ctx["peak"] + np.arange(len(ctx["acts"]))
            on = np.asarray(ctx["acts"]) > 0
            assert (ids[idx][on] == c.token_id).all() and on[ctx["peak"]]  # active exactly on the class
            assert (ids[idx][~on] != c.token_id).all() or (roles[idx][~on] == int(Role.DEFAULT_SYSTEM)).all()
            assert roles[ctx["token_index"]] in (int(Role.USER), int(Role.ASSISTANT))  # never the shared prefix
    for c in cases:
        if c.kind == "random":
            assert all(sum(a > 0 for a in ctx["acts"]) == 1 for ctx in c.contexts)
    explained = [c for c in cases if c.task == "explanation"]
    assert sum(c.positive for c in explained) == 4 == sum(not c.positive for c in explained)
    tok = cache.tokenizer()
    for c in explained:
        word = json.loads(c.explanation.removeprefix("the token "))
        assert (word == tok.decode([c.token_id]).strip()) == c.positive
    with pytest.raises(ValueError, match="word tokens occur in >= 61 held-out sequences"):
        build_cases(cache, cases=4, top_n=61)  # more sequences than the cache has


def test_random_judge_fails_and_oracle_passes(chat_cache, tmp_path):
    cache = ActivationCache.open(chat_cache[0])
    results = {}
    for name, answer in (("random", random_judge(seed=1)), ("oracle", oracle_judge)):
        server = JudgeServer(answer, lifetime_s=120)
        try:
            backend = OpenAIBackend(server.url, name, api_key_env=None, timeout_s=10)
            results[name] = calibrate(backend, cache, tmp_path / name, judge_info={"model": name}, retries=0,
                                      reply_cache=ReplyCache(tmp_path / name / "cache"), cases=8, seed=0)
            assert len(server.requests) == 32 == backend.calls  # 8 + 8 cases per task, each asked once
        finally:
            server.close()
    rand, oracle = results["random"], results["oracle"]
    assert oracle["passed"] and all(t["auc"] == 1.0 and t["n_positive"] == 8 for t in oracle["tasks"].values())
    assert not rand["passed"] and "FAILED" in rand["line"]
    assert all(t["auc"] is not None for t in rand["tasks"].values())  # it answered; it just does not separate
    written = json.loads((tmp_path / "oracle" / "judge_calibration.json").read_text())
    assert len(written["cases"]) == 32 and all(c["score"] in (1, 5) for c in written["cases"])


@pytest.mark.parametrize("judge_name", ["random", "oracle"])
def test_report_and_compare_follow_the_calibration(chat_cache, tmp_path, judge_name):
    path, acts = chat_cache
    save_pca_sae(tmp_path / "run" / "pca", acts, 1, 3, regime="fast", model_name=EMBEDDED_MODEL)
    server = JudgeServer(random_judge(seed=1) if judge_name == "random" else oracle_judge, lifetime_s=120)
    try:
        judge = JudgeConfig(backend="openai", base_url=server.url, model=judge_name, api_key_env=None, retries=0,
                            calibration_cases=6)
        out = tmp_path / "eval"
        report = run_evaluation(EvalConfig(saes=[tmp_path / "run"], caches=[path], out=out, progress=False, plots=False,
                                           downstream=DownstreamConfig(enabled=False),
                                           interpret=InterpretSettings(enabled=True, n_features=2, top_n=4),
                                           judge=judge), log=lambda _m: None)
    finally:
        server.close()
    passed = judge_name == "oracle"
    assert report["judge_calibration"]["passed"] is passed
    assert report["rows"][0]["interpretability"]["scores"]["meaningful"] is passed
    assert report["settings"]["judge"]["scores_meaningful"] is passed
    md = (out / "report.md").read_text()
    assert "## Judge calibration" in md and ("judge calibration passed" if passed else "judge calibration FAILED") in md
    assert ("top band %" in md.split("## By token filter")[0]) is passed  # main table only once calibrated
    assert ("They are listed for completeness, not as a result." in md) is not passed
    groups, cmp_md, _ = run_compare([out], tmp_path / "cmp")
    assert groups[0]["judge"]["meaningful"] is passed and ("NOT MEANINGFUL" in cmp_md) is not passed
