"""Grid training equals training alone; resuming is bit-exact; outputs are complete."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fast_sae.saeio import load_sae
from fast_sae.train.config import SPARSITY_FIELD, GridConfig, TrainConfig
from fast_sae.train.trainer import Trainer
from tests.helpers import TRAIN_RUNNER, train_env


def _cfg(**kw) -> TrainConfig:
    base = dict(tokens=12_000, batch_tokens=100, lr=1e-3, lr_end=1e-4, eval_sequences=10, buffer_tokens=1000,
                log_every=20, checkpoint_every=1000, jumprelu_bandwidth=0.1, jumprelu_init_threshold=0.1,
                dead_window_steps=10)
    base.update(kw)
    return TrainConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (a.name, k, (wa[k] - wb[k]).abs().max())


def _run(cache, out, cfg, grid, stop=None):
    return Trainer(cache, out, cfg, grid, echo=lambda s: None, progress=False).run(stop_after_steps=stop)


SPARSITY = {"l1_coefficients": [0.5, 2.0], "l0_coefficients": [0.1, 0.3], "k": [3, 6]}


@pytest.mark.slow
def test_grid_gives_the_same_weights_as_each_sae_alone(small_cache, tmp_path):
    cfg = _cfg()
    grid = GridConfig(layers=[3, 7], architectures=["standard", "jumprelu", "topk", "batchtopk"],
                      expansion_factors=[2], **SPARSITY)
    _run(small_cache, tmp_path / "grid", cfg, grid)
    for layer, arch, s in ((7, "standard", 2.0), (3, "jumprelu", 0.3), (3, "topk", 6), (7, "batchtopk", 3)):
        alone = GridConfig(layers=[layer], architectures=[arch], expansion_factors=[2], **{SPARSITY_FIELD[arch]: [s]})
        _run(small_cache, tmp_path / f"alone_{arch}", cfg, alone)
        name = alone.specs()[0].name
        _assert_same_weights(tmp_path / "grid" / name, tmp_path / f"alone_{arch}" / name)


def test_outputs_metrics_and_config(small_cache, tmp_path):
    cfg = _cfg(order="random")
    grid = GridConfig(layers=[3], architectures=["standard", "topk"], expansion_factors=[2],
                      l1_coefficients=[0.5], k=[4])
    res = _run(small_cache, tmp_path / "run", cfg, grid)
    assert res.status == "finished"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train if r["sae"] == "L3_topk_x2_k4"] == [20, 40, 60, 80, 100, 120]
    for r in train:
        assert {"mse", "explained_variance", "l0", "dead_fraction", "lr"} <= r.keys()
        assert r["explained_variance"] <= 1.0
    evals = [r for r in lines if r["split"] == "eval"]
    assert len(evals) == 2 and all(r["held_out"] for r in evals)
    first = [r for r in train if r["sae"] == "L3_standard_x2_l1_0.5"]
    assert first[-1]["mse"] < first[0]["mse"]
    sae = load_sae(tmp_path / "run" / "L3_standard_x2_l1_0.5")
    c = sae.cfg
    assert c.hook_name == "blocks.3.hook_resid_post" and c.layer == 3 and c.d_sae == 32
    assert c.apply_b_dec_to_input is False and c.run.l1_coefficient == 0.5
    assert c.normalization.factor != 1.0 and c.run.training_tokens == 12_000
    (a, b), = c.training.eval_sequence_ranges
    assert b - a == 10
    assert load_sae(tmp_path / "run" / "L3_topk_x2_k4").cfg.apply_b_dec_to_input is True
    assert not (tmp_path / "run" / "checkpoint").exists()
    again = _run(small_cache, tmp_path / "run", cfg, grid)
    assert again.status == "already finished"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["mixing", "sequential"])
def test_stop_and_resume_is_bit_exact(small_cache, tmp_path, order):
    cfg = _cfg(order=order, checkpoint_every=7)
    grid = GridConfig(layers=[3, 7], architectures=["jumprelu", "batchtopk"], expansion_factors=[2],
                      **SPARSITY)
    _run(small_cache, tmp_path / "straight", cfg, grid)
    first = _run(small_cache, tmp_path / "resumed", cfg, grid, stop=33)  # mid-cycle of the mixing buffer
    assert first.status == "stopped" and first.step == 33
    assert (tmp_path / "resumed" / "checkpoint" / "LATEST").is_file()
    assert not (tmp_path / "resumed" / "L3_jumprelu_x2_l0_0.1").exists()  # nothing final before the end
    second = _run(small_cache, tmp_path / "resumed", cfg, grid, stop=81)
    assert second.step == 81
    assert _run(small_cache, tmp_path / "resumed", cfg, grid).status == "finished"
    for spec in grid.specs():
        _assert_same_weights(tmp_path / "straight" / spec.name, tmp_path / "resumed" / spec.name)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_killed_process_resumes_to_identical_weights(small_cache, tmp_path):
    """A real subprocess killed with SIGKILL mid-run, then the same command again."""
    args = [sys.executable, "-c", TRAIN_RUNNER, str(small_cache), "--layers", "3", "--architectures", "standard,topk",
            "--expansion-factors", "4", "--tokens", "60000", "--batch-tokens", "100", "--buffer-tokens", "1000",
            "--eval-sequences", "10", "--checkpoint-every", "15", "--log-every", "50", "--lr", "1e-3",
            "--no-progress"]
    env = train_env()
    straight = subprocess.run([*args, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "checkpoint" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 150:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = subprocess.run([*args, "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    for name in ("L3_standard_x4_l1_5", "L3_topk_x4_k32"):
        _assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)
