"""Normalisation factors come from the cache's statistics; b_dec starts at the geometric median."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache, Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.train.normalize import geometric_median, initial_b_dec, normalization_method_used, scale_factor


@pytest.fixture()
def chat_like_cache(tmp_path):
    """Content tokens of norm ~1 and a few special tokens with norm 100, like chat-template markers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32) / math.sqrt(8)
    roles = np.full(1000, int(Role.USER), np.uint8)
    roles[::100] = int(Role.SPECIAL)
    x[::100] *= 100
    return ActivationCache.open(write_cache_from_arrays(tmp_path / "c", {0: x}, roles=roles, chunk_tokens=256)), x, roles


def test_scale_makes_mean_squared_norm_d_model(chat_like_cache):
    cache, x, roles = chat_like_cache
    content = roles == int(Role.USER)
    s_content = scale_factor(cache, 0, "content")
    s_all = scale_factor(cache, 0, "all")
    assert np.mean(np.sum((x[content] * s_content) ** 2, 1)) == pytest.approx(8, rel=1e-4)
    assert np.mean(np.sum((x * s_all) ** 2, 1)) == pytest.approx(8, rel=1e-4)
    assert s_content > 5 * s_all  # the special tokens would otherwise set the scale
    assert scale_factor(cache, 0, "none") == 1.0
    assert normalization_method_used(cache, 0, "content") == "content"


def test_content_falls_back_to_all_tokens_without_content(tmp_path):
    x = np.ones((100, 4), np.float32)
    roles = np.full(100, int(Role.SPECIAL), np.uint8)
    cache = ActivationCache.open(write_cache_from_arrays(tmp_path / "s", {0: x}, roles=roles))
    assert normalization_method_used(cache, 0, "content") == "all"
    assert scale_factor(cache, 0, "content") == pytest.approx(1.0)


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
