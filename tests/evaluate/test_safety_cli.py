"""`pipeline.py evaluate` as a real subprocess: non-finite inputs are reported, never scored as a
number (and log2 MSE never reads −inf for them); a judge that truncates replies leaves the run
whole; an interrupted judged run still writes report.json with the work done."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fast_sae.actcache import Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.saeio import save_sae

from .helpers import sae_cfg, save_identity_sae, save_random_sae
from .http_servers import GOOD, completion, ok_response

ROOT = Path(__file__).resolve().parents[2]
D, LAYER = 8, 2


def _evaluate(*args, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "pipeline.py", "evaluate", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kw.get("background"):
        # SIGINT back to its default in the child: a suite started as a background job (`... &`)
        # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _cache(path: Path, acts: np.ndarray, tokenizer=None) -> Path:
    starts = np.arange(0, len(acts) + 1, 20)
    roles = np.full(len(acts), int(Role.USER))
    roles[starts[:-1]] = int(Role.SPECIAL)
    kw = {}
    if tokenizer is not None:
        kw = {"token_ids": np.random.default_rng(0).integers(200, 5000, size=len(acts)), "tokenizer": tokenizer}
    return write_cache_from_arrays(path, {LAYER: acts}, seq_starts=starts, roles=roles, chunk_tokens=64, **kw)


@pytest.mark.slow
def test_nan_weights_and_nan_activations_are_reported_not_scored(tmp_path):
    acts = np.random.default_rng(0).standard_normal((200, D)).astype(np.float32)
    clean = _cache(tmp_path / "clean", acts)
    nan_sae = save_random_sae(tmp_path / "nan_sae", D, 16, LAYER)
    w = load_file(str(nan_sae / "sae_weights.safetensors"))
    w["W_dec"][3, 0] = float("nan")
    save_sae(nan_sae, w, sae_cfg(D, 16, LAYER))
    proc = _evaluate("--sae", nan_sae, "--eval-cache", clean, "--out", tmp_path / "o1", "--no-downstream",
                     "--no-plots", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o1" / "report.json").read_text())
    row = report["rows"][0]["reconstruction"]
    assert row["non_finite"]["weights"] == ["W_dec"]
    assert row["subsets"]["all"]["log2_mse"] == "nan"  # non-finite stays non-finite, never -inf
    assert any("non-finite weights (W_dec)" in w for w in report["warnings"])
    assert any("MSE is non-finite" in w for w in report["warnings"])
    assert "warning: " in proc.stderr and "non-finite weights" in proc.stderr
    md = (tmp_path / "o1" / "report.md").read_text()
    assert "non-finite weights" in md and "−inf" not in md

    # NaN / Inf activations: the cache writer refuses them; a chunk file damaged afterwards is refused by
    # the reader (checksum, or finiteness when checksums are off) in one line, never scored
    bad = _cache(tmp_path / "bad", acts)
    chunk = bad / "acts" / f"layer_{LAYER}" / "c" / "0" / "0"
    data = np.fromfile(chunk, "<f4")
    data[5 * D + 1] = np.nan
    data.tofile(chunk)
    proc = _evaluate("--sae", save_identity_sae(tmp_path / "id", D, LAYER), "--eval-cache", bad,
                     "--out", tmp_path / "o2", "--no-downstream", "--no-plots", "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error:") and str(chunk) in line and "checksum" in line, line


class _Judge:
    """A judge server whose first ``good`` replies are fine and which then never answers."""

    def __init__(self, raw_server, good: int) -> None:
        self.good = good
        self.server = raw_server(self.respond)

    def respond(self, sock: socket.socket, req: dict) -> None:
        if len(self.server.requests) <= self.good:
            ok_response(sock, req, completion(GOOD))
        else:
            time.sleep(60)


@pytest.mark.slow
def test_an_interrupted_judged_evaluation_writes_what_it_has(tmp_path, raw_server, embedded_model):
    acts = np.random.default_rng(0).standard_normal((400, D)).astype(np.float32)
    cache = _cache(tmp_path / "cache", acts, tokenizer=embedded_model[1])
    saes = [save_random_sae(tmp_path / f"sae{i}", D, 16, LAYER, seed=i) for i in range(2)]
    judge = _Judge(raw_server, good=3)  # SAE 0: 2 features judged; SAE 1: 1 judged, then the server stalls
    proc = _evaluate("--sae", saes[0], "--sae", saes[1], "--eval-cache", cache, "--out", tmp_path / "out",
                     "--no-downstream", "--no-plots", "--no-progress", "--interpret", "--n-features", "2",
                     "--judge-backend", "openai", "--judge-url", judge.server.url, "--judge-model", "m",
                     "--judge-retries", "0", "--judge-timeout", "120", "--no-judge-calibrate", background=True)
    deadline = time.time() + 240
    while len(judge.server.requests) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(judge.server.requests) == 4, proc.communicate()[1] if proc.poll() is not None else "no 4th request"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the judge hangs
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["incomplete"].startswith("KeyboardInterrupt")
    done, cut = report["rows"]
    assert done["interpretability"]["scores"]["n_scored"] == 2 and cut["interpretability"] is None
    assert done["reconstruction"]["subsets"]["all"]["n_tokens"] == 400
    partial = json.loads(next((tmp_path / "out" / "interpret").glob("*sae1*/judge_scores.json")).read_text())
    assert partial["incomplete"].startswith("KeyboardInterrupt") and len(partial["records"]) == 1
    assert partial["records"][0]["score"] == 4
    assert "incomplete evaluation" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_a_truncating_judge_leaves_the_run_whole(tmp_path, raw_server, embedded_model):
    acts = np.random.default_rng(0).standard_normal((200, D)).astype(np.float32)
    cache = _cache(tmp_path / "cache", acts, tokenizer=embedded_model[1])
    body = completion(GOOD)

    def short(sock, _):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:30])

    server = raw_server(short)
    proc = _evaluate("--sae", save_random_sae(tmp_path / "sae", D, 16, LAYER), "--eval-cache", cache,
                     "--out", tmp_path / "out", "--no-downstream", "--no-plots", "--no-progress", "--interpret",
                     "--n-features", "2", "--judge-backend", "openai", "--judge-url", server.url,
                     "--judge-model", "m", "--judge-retries", "1", "--judge-timeout", "5", "--no-judge-calibrate")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    interp = report["rows"][0]["interpretability"]
    assert interp["scores"]["n_judged"] == 2 and interp["scores"]["n_scored"] == 0
    scores = json.loads(Path(interp["files"]["judge_scores"]).read_text())
    assert all("truncated" in r["reason"] for r in scores["records"]) and len(server.requests) == 4
    assert torch.isfinite(torch.tensor(report["rows"][0]["reconstruction"]["subsets"]["all"]["mse"]))
