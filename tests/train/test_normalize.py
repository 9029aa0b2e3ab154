"""Normalisation: a robust statistic of training tokens (no position 0, no outliers), optionally shared
from another cache; b_dec starts at the geometric median of a shuffled sample."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache, CacheError, Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.train.config import GridConfig, TrainConfig
from fast_sae.train.normalize import geometric_median, initial_b_dec, normalization, sample_indices
from fast_sae.train.trainer import Trainer

D = 8


def _chat_like(path, n_seq: int = 50, length: int = 20, content_scale: float = 1.0, seed: int = 0) -> tuple:
    """Sequences of 20 tokens: a sink at position 0 (norm 1000), template tokens (norm ~3) at positions 1-2
    and content tokens of norm ~content_scale; a few content tokens are outliers (norm 500)."""
    rng = np.random.default_rng(seed)
    n = n_seq * length
    x = rng.standard_normal((n, D)) / math.sqrt(D) * content_scale
    roles = np.full(n, int(Role.USER), np.uint8)
    pos = np.arange(n) % length
    roles[pos == 0], roles[(pos == 1) | (pos == 2)] = int(Role.SPECIAL), int(Role.TEMPLATE)
    x[pos == 0] *= 1000 / content_scale
    x[(pos == 1) | (pos == 2)] *= 3 / content_scale
    outliers = np.flatnonzero(pos == 7)[::10]
    x[outliers] *= 500 / content_scale
    starts = np.arange(0, n + 1, length)
    path = write_cache_from_arrays(path, {0: x.astype(np.float32)}, seq_starts=starts, roles=roles, chunk_tokens=128)
    return ActivationCache.open(path), x, roles, pos, outliers


def test_statistic_leaves_out_position_0_outliers_and_held_out_tokens(tmp_path):
    cache, x, roles, pos, outliers = _chat_like(tmp_path / "c")
    train = (0, 800)  # the last 10 sequences are held out: their tokens must not count
    keep = np.zeros(len(x), bool)
    keep[:800] = True
    keep &= pos != 0
    keep[outliers] = False
    content = keep & (roles == int(Role.USER))
    expected = {}
    for method, mask in (("content", content), ("all", keep)):
        norm = normalization(cache, 0, method, train)
        expected[method] = math.sqrt(D / np.mean(np.sum(x[mask].astype(np.float32).astype(np.float64) ** 2, 1)))
        assert norm.factor == pytest.approx(expected[method], rel=1e-6), method
        assert norm.method == method and norm.source is not None and norm.source.path == str(cache.path.resolve())
        assert norm.excluded_position0 == 40 and norm.excluded_outliers == int((outliers < 800).sum())
        assert norm.n_used == int(mask.sum()) and norm.source_token_range == train
    assert normalization(cache, 0, "content", train).factor > 1.3 * normalization(cache, 0, "all", train).factor
    x2 = x.copy()
    x2[800:] *= 50  # held-out tokens changed: same constant
    other = ActivationCache.open(write_cache_from_arrays(tmp_path / "c2", {0: x2.astype(np.float32)},
                                                         seq_starts=np.arange(0, 1001, 20), roles=roles))
    assert normalization(other, 0, "content", train).factor == normalization(cache, 0, "content", train).factor
    assert normalization(cache, 0, "none", train).factor == 1.0
    # a sample of the range (seeded, so the same every time) when the range exceeds the budget
    a, b = normalization(cache, 0, "content", train, sample_tokens=300), \
        normalization(cache, 0, "content", train, sample_tokens=300)
    assert a.n_sampled == 300 and a.factor == b.factor and a.factor == pytest.approx(expected["content"], rel=0.2)


def test_content_falls_back_to_all_tokens_without_content(tmp_path):
    x = np.ones((100, 4), np.float32)
    roles = np.full(100, int(Role.SPECIAL), np.uint8)
    cache = ActivationCache.open(write_cache_from_arrays(tmp_path / "s", {0: x}, roles=roles,
                                                         seq_starts=np.arange(0, 101, 10)))
    norm = normalization(cache, 0, "content", (0, 100))
    assert norm.method == "all" and norm.requested == "content" and norm.factor == pytest.approx(1.0)


def _train(cache, out, **kw):
    cfg = TrainConfig(tokens=1000, batch_tokens=100, lr=1e-3, buffer_tokens=400, log_every=5,
                      checkpoint_every=1000, **kw)
    grid = GridConfig(layers=[0], architectures=["standard", "topk"], expansion_factors=[1],
                      l1_coefficients=[0.5], k=[2])
    Trainer(cache, out, cfg, grid, echo=lambda s: None, progress=False).run()
    cfgs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/cfg.json")}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfgs, metrics


def test_shared_normalisation_is_applied_identically_to_every_regime(tmp_path):
    """Three caches of different scale (like FAST, BT(F), BT(P)) trained with --normalize-from one of them."""
    caches = {regime: _chat_like(tmp_path / regime, content_scale=scale, seed=i)[0].path
              for i, (regime, scale) in enumerate((("fast", 1.0), ("bt-f", 3.0), ("bt-p", 0.2)))}
    shared = {regime: _train(path, tmp_path / f"run_{regime}", normalize_from=str(caches["fast"]))
              for regime, path in caches.items()}
    factors = set()
    for cfgs, metrics in shared.values():
        for cfg in cfgs.values():
            n = cfg["metadata"]["fast_sae"]["normalization"]
            assert n["source"]["path"] == str(caches["fast"].resolve())
            factors.add(n["factor"])
        # the factor really applied: the trainer logs MSE in raw and normalised units, ratio s^2
        for m in (m for m in metrics if m["split"] == "train"):
            assert m["mse_normalized"] / m["mse"] == pytest.approx(n["factor"] ** 2, rel=1e-6)
    assert len(factors) == 1
    own = {regime: normalization(ActivationCache.open(path), 0, "content", (0, 1000)).factor
           for regime, path in caches.items()}
    assert len(set(own.values())) == 3  # each cache's own statistic differs
    assert factors == {own["fast"]}  # the constant the FAST run computes for itself


def test_normalize_from_an_incompatible_cache_is_refused(tmp_path):
    cache = _chat_like(tmp_path / "c")[0]
    other = write_cache_from_arrays(tmp_path / "d4", {0: np.ones((40, 4), np.float32)}, seq_starts=[0, 20, 40])
    with pytest.raises(CacheError, match="--normalize-from .*d_model 4"):
        Trainer(cache.path, tmp_path / "r", TrainConfig(tokens=200, batch_tokens=100, normalize_from=str(other)),
                GridConfig(layers=[0]), echo=lambda s: None)


def test_sample_indices_are_seeded_spread_and_distinct():
    a = sample_indices(100, 100_100, 1000, seed=1)
    assert len(set(a.tolist())) == 1000 and np.all(np.diff(a) > 0) and a[0] >= 100 and a[-1] < 100_100
    assert a.max() - a.min() > 90_000  # spread over the range, not its first tokens
    assert np.array_equal(a, sample_indices(100, 100_100, 1000, seed=1))
    assert not np.array_equal(a, sample_indices(100, 100_100, 1000, seed=2))
    assert np.array_equal(sample_indices(5, 10, 1000, seed=1), np.arange(5, 10))


def test_geometric_median_resists_outliers():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((500, 3)) * 0.1 + np.array([1.0, 2.0, 3.0])
    pts[:20] = 1000.0
    med = geometric_median(torch.from_numpy(pts.astype(np.float32)))
    assert torch.allclose(med, torch.tensor([1.0, 2.0, 3.0]), atol=0.05)
    assert not np.allclose(pts.mean(0), [1, 2, 3], atol=1)
    mean_init = initial_b_dec("mean", pts.astype(np.float32), np.array([1.0, 2.0, 3.0]), 2.0)
    assert mean_init.tolist() == [2.0, 4.0, 6.0]
    assert initial_b_dec("zeros", pts.astype(np.float32), np.zeros(3), 1.0).abs().sum() == 0
