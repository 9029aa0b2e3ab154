"""Judge prompts, strict parsing, the reply cache, retries and score bands (HTTP backend on a real local server)."""
from __future__ import annotations

import pytest

from fast_sae.evaluate.interpret import JudgeConfig
from fast_sae.evaluate.interpret.judge import (
    JudgeParseError,
    ReplyCache,
    load_prompt,
    parse_quality,
    parse_verdict,
    render_contexts,
    score_bands,
    score_features,
)
from fast_sae.evaluate.interpret.judge_backends import OpenAIBackend, make_backend

GOOD = "The feature fires on end-of-turn markers.\nMy final verdict score is: [[4]], feature name is [[end of turn]]"
REPORTS = [
    {"feature": 3, "contexts": [{"tokens": ["<|im_end|>", "\n", "Hi"], "acts": [7.5, 0.0, 0.25], "max_act": 7.5}]},
    {"feature": 9, "contexts": [{"tokens": ["cat", " \"dog\""], "acts": [1.0, 2.0], "max_act": 2.0}]},
]


def test_parse_verdict_accepts_the_format():
    assert parse_verdict(GOOD) == (parse_verdict(GOOD))
    v = parse_verdict(GOOD)
    assert (v.score, v.name) == (4, "end of turn")
    v = parse_verdict("my final verdict score is: [[ 5 ]],  feature name is [[Role header `user`]]")
    assert (v.score, v.name) == (5, "Role header `user`")
    twice = GOOD + "\nTo repeat: My final verdict score is: [[4]], feature name is [[end of turn]]"
    assert parse_verdict(twice).score == 4  # the same verdict twice is unambiguous


@pytest.mark.parametrize("reply, message", [
    ("I think this feature is about cats. Score 4.", "no line 'My final verdict score is"),
    ("My final verdict score is: [[6]], feature name is [[cats]]", "outside 1-5"),
    ("My final verdict score is: [[0]], feature name is [[cats]]", "outside 1-5"),
    ("My final verdict score is: [[four]], feature name is [[cats]]", "not an integer"),
    ("My final verdict score is: [[4.5]], feature name is [[cats]]", "not an integer"),
    ("My final verdict score is: [[S]], feature name is [[NAME]]", "not an integer"),
    ("My final verdict score is: [[3]], feature name is [[]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[NAME]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[S]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[<name>]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[Feature name]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[...]]", "empty or placeholder"),
    ("My final verdict score is: [[3]], feature name is [[a]]\nMy final verdict score is: [[5]], feature name is [[b]]",
     "conflicting verdicts"),
    ("", "no line"),
])
def test_parse_verdict_rejects_malformed_replies(reply, message):
    with pytest.raises(JudgeParseError, match=message):
        parse_verdict(reply)


def test_parse_quality():
    assert parse_quality("Clear and correct.\nQuality score: [[10]]") == 10
    assert parse_quality("quality score: [[ 3 ]]") == 3
    for bad, message in [("Quality score: 7", "no line"), ("Quality score: [[11]]", "outside 1-10"),
                         ("Quality score: [[7/10]]", "not an integer"),
                         ("Quality score: [[2]] ... Quality score: [[9]]", "conflicting")]:
        with pytest.raises(JudgeParseError, match=message):
            parse_quality(bad)


def test_prompts_load_and_render():
    p = load_prompt("judge_v1")
    assert "Activation Consistency" in p.system and "[[S]]" in p.system and len(p.sha256) == 64
    msgs = p.messages(feature=3, contexts=render_contexts(REPORTS[0]["contexts"]))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Feature index: 3" in msgs[1]["content"]
    assert '"<|im_end|>" (7.50) "\\n" (0) "Hi" (0.25)' in msgs[1]["content"]
    assert "{" + "contexts}" not in msgs[1]["content"]
    q = load_prompt("reply_quality_v1")
    assert "Quality score: [[S]]" in q.system
    with pytest.raises(KeyError, match="reply"):
        q.messages(instruction="x")


def test_score_bands_known_values():
    recs = [{"score": s} for s in (1, 2, 3, 3, 4, 5, 5, 5)] + [{"score": None, "reason": "malformed"}]
    b = score_bands(recs)
    assert (b["n_judged"], b["n_scored"], b["n_unscored"]) == (9, 8, 1)
    assert b["counts"] == {"1": 1, "2": 1, "3": 2, "4": 1, "5": 3}
    assert b["top_range_share"] == pytest.approx(4 / 8)
    assert b["cdf"]["3"] == pytest.approx(4 / 8) and b["cdf"]["5"] == 1.0
    assert b["share"]["5"] == pytest.approx(3 / 8) and b["mean_score"] == pytest.approx(28 / 8)
    assert score_bands([])["top_range_share"] is None


def test_http_backend_against_local_server(chat_server, monkeypatch):
    server = chat_server([GOOD])
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    backend = make_backend(JudgeConfig(backend="openai", model="judge-model", base_url=server.url,
                                       api_key_env="TEST_JUDGE_KEY", max_new_tokens=32))
    assert isinstance(backend, OpenAIBackend) and backend.url == server.url + "/chat/completions"
    recs = score_features(REPORTS, backend, None, retries=0)
    assert [(r["feature"], r["score"], r["name"]) for r in recs] == [(3, 4, "end of turn"), (9, 4, "end of turn")]
    assert len(server.requests) == 2 and backend.calls == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test-123"
    assert req["body"]["model"] == "judge-model" and req["body"]["max_tokens"] == 32
    assert req["body"]["temperature"] == 0.0
    assert "Feature index: 3" in req["body"]["messages"][1]["content"]


def test_malformed_and_failed_replies_are_retried_then_recorded_unscored(chat_server):
    # feature 3: malformed, then HTTP 500, then good (3 attempts); feature 9: malformed x2 -> unscored
    server = chat_server(["no verdict here", 500, GOOD, "still nothing", "My final verdict score is: [[9]], "
                                                                          "feature name is [[x]]"])
    backend = OpenAIBackend(server.url, "m", api_key_env=None)
    recs = score_features(REPORTS, backend, None, retries=2)
    assert recs[0]["score"] == 4 and recs[0]["attempts"] == 3 and recs[0]["reason"] is None
    assert recs[1]["score"] is None and recs[1]["attempts"] == 3
    assert "outside 1-5" in recs[1]["reason"]
    assert server.requests[0]["auth"] is None
    assert server.requests[1]["body"]["temperature"] == 0.7  # retries sample
    unreachable = OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout_s=2)  # discard port: refused
    rec = score_features(REPORTS[:1], unreachable, None, retries=1)[0]
    assert rec["score"] is None and rec["reason"].startswith("backend error") and unreachable.calls == 2


def test_http_backend_rejects_broken_response_bodies(chat_server):
    from fast_sae.evaluate.interpret.judge import BackendError

    server = chat_server([b"not json", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}', 404])
    backend = OpenAIBackend(server.url.removesuffix("/v1"), "m")  # the /v1 suffix is optional
    for message in ("not JSON", "lacks choices", "expected text", "HTTP 404"):
        with pytest.raises(BackendError, match=message):
            backend.complete([{"role": "user", "content": "hi"}])
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 4


def test_reply_cache_second_run_asks_nothing(chat_server, tmp_path):
    server = chat_server(["bad", GOOD])
    cache = ReplyCache(tmp_path / "judge_cache")
    first_backend = OpenAIBackend(server.url, "m")
    first = score_features(REPORTS, first_backend, cache, retries=1)
    assert first_backend.calls == 3  # bad, good (feature 3); good (feature 9)
    second_backend = OpenAIBackend(server.url, "m")
    second = score_features(REPORTS, second_backend, cache, retries=1)
    assert second_backend.calls == 0 and len(server.requests) == 3
    assert [(r["score"], r["name"], r["attempts"]) for r in second] == [(r["score"], r["name"], r["attempts"])
                                                                        for r in first]
    assert second[0]["cached_replies"] == 2
    # another model (or prompt, or feature content) is a different key: it asks again
    other = OpenAIBackend(server.url, "other-model")
    score_features(REPORTS[:1], other, cache, retries=0)
    assert other.calls == 1
