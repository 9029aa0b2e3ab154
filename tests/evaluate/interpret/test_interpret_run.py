"""``run_interpretability`` end to end: files, sampling, score bands, judge cache on rerun, local judge."""
from __future__ import annotations

import json

import pytest

from fast_sae.evaluate.interpret import JudgeConfig, run_interpretability
from fast_sae.evaluate.interpret.judge import score_features
from fast_sae.evaluate.interpret.judge_backends import LocalBackend
from fast_sae.lm import EMBEDDED_MODEL


def verdict(score: int, name: str) -> str:
    return f"Reasoning...\nMy final verdict score is: [[{score}]], feature name is [[{name}]]"


@pytest.mark.slow
def test_run_interpretability_with_http_judge_and_rerun_from_cache(synthetic, chat_server, tmp_path):
    sae, cache, _, _ = synthetic
    server = chat_server([verdict(5, "a"), verdict(2, "b"), "I cannot tell.", verdict(4, "d")])
    judge = JudgeConfig(backend="openai", model="m", base_url=server.url, retries=0, cache_dir=tmp_path / "jc")
    out = tmp_path / "out"
    summary = run_interpretability(sae, cache, out, n_features=4, top_n=3, window=2, judge=judge, seed=1)
    assert set(summary["files"]) == {"top_examples", "judge_scores", "dashboard"}
    top = json.loads((out / "top_examples.json").read_text())
    scores = json.loads((out / "judge_scores.json").read_text())
    html = (out / "dashboard.html").read_text()
    assert len(top["density"]) == 24 and top["top_n"] == 3 and len(top["features"]) == 4
    assert top["selection_rule"] == summary["selection_rule"] and "2 token ids before" in top["selection_rule"]
    assert "Top examples: the highest-activating token of each sequence" in html
    assert [f["feature"] for f in top["features"]] == summary["features"] == sorted(summary["features"])
    for f in top["features"]:
        assert 1 <= len(f["contexts"]) <= 3 and all(len(c["tokens"]) <= 5 for c in f["contexts"])
        assert f"data-feature=\"{f['feature']}\"" in html
    assert [r["score"] for r in scores["records"]] == [5, 2, None, 4]
    assert "no line" in scores["records"][2]["reason"]
    bands = summary["scores"]
    assert bands == scores["bands"] and bands["n_scored"] == 3 and bands["top_range_share"] == 2 / 3
    assert scores["backend_calls"] == 4 and len(server.requests) == 4
    again = run_interpretability(sae, cache, out, n_features=4, top_n=3, window=2, judge=judge, seed=1)
    assert len(server.requests) == 4  # the rerun asked nothing
    assert json.loads((out / "judge_scores.json").read_text())["backend_calls"] == 0
    assert again["scores"] == bands and again["features"] == summary["features"]
    # the seed picks the sample; without a judge no judge file is written
    other = run_interpretability(sae, cache, tmp_path / "o2", n_features=4, top_n=3, window=2, seed=2)
    assert other["scores"] is None and "judge_scores" not in other["files"]
    allf = run_interpretability(sae, cache, tmp_path / "o3", n_features=10_000, top_n=1, window=0)
    assert allf["n_features_sampled"] == allf["n_live"] and set(summary["features"]) <= set(allf["features"])


@pytest.mark.slow
def test_local_backend_judges_with_the_embedded_model(embedded_model):
    model, tok = embedded_model
    backend = LocalBackend(EMBEDDED_MODEL, max_new_tokens=8, model=model, tokenizer=tok)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say OK."}]
    first = backend.complete(msgs)
    assert isinstance(first, str) and first.strip() and backend.calls == 1
    assert backend.complete(msgs) == first  # attempt 0 is greedy: reproducible
    reports = [{"feature": 0, "contexts": [{"tokens": ["<|im_end|>", "\n"], "acts": [3.0, 0.0], "max_act": 3.0}]}]
    rec = score_features(reports, backend, None, retries=1)[0]
    assert (rec["score"] is None) != (rec["reason"] is None)
    assert backend.calls == 2 + rec["attempts"] and len(rec["replies"]) == rec["attempts"]


@pytest.mark.slow
def test_run_interpretability_local_judge_default_model(synthetic, embedded_model, tmp_path):
    sae, cache, _, _ = synthetic
    judge = JudgeConfig(max_new_tokens=6, retries=0)  # defaults: local backend, the embedded model
    assert (judge.backend, judge.model) == ("local", EMBEDDED_MODEL)
    summary = run_interpretability(sae, cache, tmp_path / "o", n_features=1, top_n=2, window=1, judge=judge,
                                   judge_model=embedded_model)
    recs = json.loads((tmp_path / "o" / "judge_scores.json").read_text())["records"]
    assert len(recs) == 1 and summary["scores"]["n_judged"] == 1
    assert all((r["score"] is None) != (r["reason"] is None) for r in recs)


@pytest.mark.slow
def test_local_constrained_answer_form_picks_the_most_likely_choice(embedded_model):
    import torch

    from fast_sae.evaluate.interpret.judge import VERDICT_FORM, AnswerForm, load_prompt, parse_verdict

    model, tok = embedded_model
    backend = LocalBackend(EMBEDDED_MODEL, max_new_tokens=8, model=model, tokenizer=tok)
    form = AnswerForm("Score: [[", ("1", "2", "7", "10"), "]]")  # "10" is two tokens: exercises the padding
    msgs = [{"role": "user", "content": "Rate the sentence 'Paris is in France' from 1 to 10."}]
    reply = backend.complete(msgs, form=form)
    # reference: each choice scored on its own, unbatched and unpadded, by full-sequence log-likelihood
    context = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + form.prefix
    base = tok(context, add_special_tokens=False)["input_ids"]

    def loglik(choice: str) -> float:
        ids = tok(context + choice + "]]", add_special_tokens=False)["input_ids"]
        assert ids[:len(base)] == base
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return float(sum(logp[j - 1, ids[j]] for j in range(len(base), len(ids))))

    assert reply == f"Score: [[{max(form.choices, key=loglik)}]]"
    v = parse_verdict(backend.complete(load_prompt("judge_v1").messages(feature=1, contexts='"cat" (2.00)'),
                                       form=VERDICT_FORM))
    assert 1 <= v.score <= 5 and v.name.upper() not in ("NAME", "S")


@pytest.mark.slow
def test_dead_sae_and_wrong_layer_are_handled(synthetic, tmp_path):
    import pytest
    import torch

    from fast_sae.actcache import CacheError
    from fast_sae.saeio import load_sae, save_sae
    from tests.evaluate.interpret.conftest import make_sae

    _, cache, _, _ = synthetic
    dead = load_sae(make_sae(tmp_path / "live"))
    weights = {"W_enc": dead.W_enc.data, "W_dec": dead.W_dec.data, "b_enc": torch.full((24,), -1e6),
               "b_dec": dead.b_dec.data}
    save_sae(tmp_path / "dead", weights, dead.cfg)
    summary = run_interpretability(tmp_path / "dead", cache, tmp_path / "o", n_features=4)
    assert summary["n_live"] == 0 and summary["features"] == [] and summary["dead_fraction"] == 1.0
    assert (tmp_path / "o" / "dashboard.html").is_file()
    with pytest.raises(CacheError, match="hook_layer 7 not in the cache"):
        run_interpretability(make_sae(tmp_path / "l7", layer=7), cache, tmp_path / "o7")
