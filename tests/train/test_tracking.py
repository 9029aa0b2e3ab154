"""Weights & Biases tracking of a train run, with the real wandb library in offline mode (no network).

The W&B run is read back with wandb's own reader of its run files (``wandb leet inspect --json``,
the wandb-core reader behind ``wandb sync``), never by parsing the file here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fast_sae.train.config import ConfigError, TrainConfig, build_config
from fast_sae.train.runfiles import read_metrics
from fast_sae.train.tracking import STATE, Tracker, history_rows
from tests.helpers import run_train

ARGS = ["--layers", "3", "--architectures", "standard,topk", "--k", "4", "--expansion-factors", "2",
        "--tokens", "4000", "--batch-tokens", "100", "--buffer-tokens", "1000", "--eval-sequences", "10",
        "--log-every", "5", "--checkpoint-every", "10", "--no-progress"]
STEPS = 40


def wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """wandb's own folders (settings, cache, staging) in the test's folder, not the user's home."""
    return {"WANDB_CONFIG_DIR": str(tmp_path / "wb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wb-cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wb-data"), **extra}


def read_wandb_run(folder: Path) -> list[dict[str, Any]]:
    """The records of one offline run folder, as wandb's reader prints them (one JSON object a line)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_history_rows_namespace_every_sae_and_skip_missing_values():
    rows = [{"step": 5, "tokens": 500, "split": "train", "sae": "A", "mse": 1.5, "l0": 3.0, "lr": 0.1,
             "sparsity_coefficient": None},
            {"step": 5, "tokens": 500, "split": "train", "sae": "B", "mse": 2.5, "l0": 4.0, "lr": 0.1,
             "sparsity_coefficient": 0.2},
            {"step": 10, "split": "eval", "sae": "A", "mse": 9.0}]
    assert history_rows(rows) == {5: {"A/mse": 1.5, "A/l0": 3.0, "B/mse": 2.5, "B/l0": 4.0,
                                      "B/sparsity_coefficient": 0.2, "train/lr": 0.1, "train/tokens": 500}}


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="wandb_mode 'cloud': expected one of online, offline, disabled"):
        build_config({"train": {"wandb_mode": "cloud"}}, {}, {}, [0])
    cfg, _ = build_config({"train": {"wandb_project": "p"}}, {"wandb_mode": "offline"}, {}, [0])
    assert (cfg.wandb_project, cfg.wandb_mode) == ("p", "offline")


@pytest.mark.slow
def test_offline_run_reads_back_with_the_metrics_values_and_resumes_without_duplicates(small_cache, tmp_path):
    """Three sessions of one run: untracked, then tracked (the W&B run gets the earlier points from
    metrics.jsonl), then resumed (the same W&B run id continues); W&B holds each step exactly once,
    with metrics.jsonl's values, plus the config and the end-of-run table."""
    run = tmp_path / "run"
    env = wandb_env(tmp_path)
    run_train(str(small_cache), "--out", str(run), *ARGS, "--stop-after-steps", "12", env=env)
    assert not (run / "wandb").exists()
    second = run_train(str(small_cache), "--out", str(run), *ARGS, "--wandb-project", "fast-sae-test",
                       "--wandb-mode", "offline", "--stop-after-steps", "22", env=env)
    assert "wandb: run " in second.stdout and ", new" in second.stdout
    run_id = json.loads((run / STATE).read_text())["id"]
    third = run_train(str(small_cache), "--out", str(run), *ARGS, "--wandb-project", "fast-sae-test",
                      env={**env, "WANDB_MODE": "offline"})
    assert f"wandb: run {run_id} (offline), continued after step 20" in third.stdout
    assert f"wandb sync --id {run_id} -p fast-sae-test {run}/wandb/offline-run-*-{run_id}" in third.stdout

    fragments = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(fragments) == 2
    records = [read_wandb_run(f) for f in fragments]
    for recs in records:
        (header,) = [r["run"] for r in recs if r["type"] == "run"]
        assert header["run_id"] == run_id and header["project"] == "fast-sae-test" and header["display_name"] == "run"
    history = [(r["history"]["step"]["num"], r["history"]["item"]) for recs in records for r in recs
               if r["type"] == "history"]
    steps = [s for s, _ in history]
    assert steps == list(range(5, STEPS + 1, 5))  # each step once, in order, over both sessions
    assert [s for s, _ in history if s <= 20] == [5, 10, 15, 20]  # all in the first tracked session
    metrics = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(metrics) == 2 * len(steps)
    by_step = dict(history)
    for r in metrics:
        item = by_step[r["step"]]
        for key in ("mse", "mse_normalized", "explained_variance", "l0", "dead_fraction"):
            assert item[f"{r['sae']}/{key}"] == r[key], (r["step"], r["sae"], key)
        assert item["train/lr"] == r["lr"] and item["train/tokens"] == r["tokens"]
    assert "L3_topk_x2_k4/sparsity_coefficient" not in by_step[5]

    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for recs in records:
        for r in recs:
            if r["type"] == "run":
                config.update(r["run"]["config"]["update"])
            if r["type"] == "config":
                config.update(r["config"].get("update", {}))
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
    run_cfg = json.loads((run / "run_config.json").read_text())
    assert config["grid"] == run_cfg["grid"] and config["cache"] == run_cfg["cache"]
    assert config["train"]["wandb_project"] == "fast-sae-test" and config["train"]["lr"] == run_cfg["train"]["lr"]
    finished = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    for row in finished["saes"]:
        assert summary[f"{row['sae']}/eval/mse"] == row["mse"] and summary[f"{row['sae']}/eval/l0"] == row["l0"]
    assert summary["eval/saes"]["_type"] == "table-file" and summary["eval/saes"]["nrows"] == 2

    dry = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", "--id", run_id, "-p", "fast-sae-test",
                          *map(str, fragments)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0 and dry.stderr.count(f"run-{run_id}.wandb") == 2, dry.stdout + dry.stderr


@pytest.mark.slow
def test_a_tracker_that_cannot_start_is_one_warning_and_the_run_finishes(small_cache, tmp_path):
    """Online without an API key (wandb raises at init), and without wandb installed at all."""
    env = wandb_env(tmp_path, WANDB_MODE="online", WANDB_API_KEY="", HOME=str(tmp_path / "home"))
    proc = run_train(str(small_cache), "--out", str(tmp_path / "run"), *ARGS, "--wandb-project", "p", env=env)
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "W&B tracking" in line]
    assert warnings == [f"warning: W&B tracking stopped (wandb.init: UsageError: No API key configured. Use "
                        f"`wandb login` to log in.); training goes on and {tmp_path / 'run' / 'metrics.jsonl'} has "
                        f"every point"]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert not (tmp_path / "run" / STATE).exists()

    runner = "import sys; sys.modules['wandb'] = None; " + \
        "import torch; torch.set_num_threads(1); from fast_sae.train.cli import train_cmd; train_cmd(sys.argv[1:])"
    from tests.helpers import train_env

    absent = subprocess.run([sys.executable, "-c", runner, str(small_cache), "--out", str(tmp_path / "run2"), *ARGS,
                             "--wandb-project", "p"], env={**train_env(), **env}, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert absent.returncode == 0, absent.stderr[-2000:]
    assert [line for line in absent.stdout.splitlines() if "W&B" in line] == [
        f"warning: W&B tracking stopped (wandb is not installed (pip install 'fast-sae[tracking]')); training goes "
        f"on and {tmp_path / 'run2' / 'metrics.jsonl'} has every point"]


def _children() -> set[int]:
    pid = os.getpid()
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(p) for p in (task / "children").read_text().split()}
    return out


@pytest.mark.slow
def test_the_wandb_service_dying_mid_run_is_one_warning(tmp_path, monkeypatch):
    """wandb's service process killed while the run goes on: the next log is one warning, then nothing."""
    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    lines: list[str] = []
    (tmp_path / "metrics.jsonl").write_text("")
    tracker = Tracker(TrainConfig(wandb_project="p", wandb_mode="offline"), tmp_path, echo=lines.append)
    before = _children()
    tracker.start({"train": {}}, tmp_path / "metrics.jsonl", 0)
    assert tracker.enabled, lines
    row = {"step": 5, "tokens": 50, "split": "train", "sae": "A", "mse": 1.0, "lr": 0.1}
    tracker.log([row])
    tracker.flush()
    service = [p for p in _children() - before if Path(f"/proc/{p}/comm").read_text().strip() == "wandb-core"]
    assert len(service) == 1
    os.kill(service[0], signal.SIGKILL)
    time.sleep(0.5)
    for step in (10, 15):
        tracker.log([{**row, "step": step}])
    tracker.summary([{"sae": "A", "mse": 1.0}], 15, 150)
    tracker.finish()
    assert [line for line in lines if line.startswith("warning")] == [
        f"warning: W&B tracking stopped (wandb.log: ConnectionResetError: Connection lost); training goes on and "
        f"{tmp_path / 'metrics.jsonl'} has every point"]
    assert not tracker.enabled and json.loads((tmp_path / STATE).read_text())["last_step"] == 5
