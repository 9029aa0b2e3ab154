"""Learning-rate and sparsity warm-up curves (SAELens 5.3.3 semantics, docs/method.md §3); memory check."""
from __future__ import annotations

import pytest

from fast_sae.train.config import SAESpec, TrainConfig
from fast_sae.train.memory import estimate
from fast_sae.train.schedule import lr_at, sparsity_scale_at


def test_paper_lr_curve():
    cfg = TrainConfig(lr=7e-5, lr_end=7e-6, warmup_frac=16_000 / 320_000, decay_frac=64_000 / 320_000)
    total = 320_000
    assert lr_at(0, cfg, total) == pytest.approx(7e-5 / 16_000)
    assert lr_at(15_999, cfg, total) == pytest.approx(7e-5)
    assert lr_at(16_000, cfg, total) == pytest.approx(7e-5)
    assert lr_at(16_000 + 120_000, cfg, total) == pytest.approx((7e-5 + 7e-6) / 2)
    assert lr_at(255_999, cfg, total) == pytest.approx(7e-6, rel=1e-3)
    assert lr_at(256_000, cfg, total) == pytest.approx(7e-6)
    assert lr_at(319_999, cfg, total) == pytest.approx(7e-6 / 64_000)
    values = [lr_at(s, cfg, total) for s in range(16_000, 320_000, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_sparsity_warmup():
    cfg = TrainConfig(sparsity_warmup_frac=10_000 / 320_000)
    assert sparsity_scale_at(0, cfg, 320_000) == pytest.approx(1 / 10_000)
    assert sparsity_scale_at(9_999, cfg, 320_000) == 1.0
    assert sparsity_scale_at(200_000, cfg, 320_000) == 1.0
    assert sparsity_scale_at(0, TrainConfig(sparsity_warmup_frac=0), 10) == 1.0


def test_memory_estimate_grows_with_the_grid():
    cfg = TrainConfig(batch_tokens=4096)
    one = estimate([SAESpec(0, "standard", 8, 5.0)], 576, 1, cfg)
    four = estimate([SAESpec(0, "standard", 8, s) for s in (1.0, 2.0, 3.0, 4.0)], 576, 1, cfg)
    assert four.sae_state == 4 * one.sae_state
    # 576 x 4608 fp32 weights x2 matrices x4 copies (weights, grads, Adam m, v) ~ 81 MiB
    assert 80 * 2**20 < one.sae_state < 90 * 2**20
    assert one.fits(same_device=True)
    huge = estimate([SAESpec(0, "topk", 100_000, 32)], 4096, 1, cfg)
    assert not huge.fits(same_device=True)
    assert "memory estimate" in one.line()
