"""Activation normalisation constants and the decoder-bias initial value.

Why normalise at all (the paper trains on raw residuals): one set of hyper-parameters then fits
every layer and model, whose residual norms differ by orders of magnitude. The factor comes from
statistics the harvest stored, so it is fixed before training starts and identical on every
process. ``content`` (default) makes E||x||^2 = d_model over content tokens only: chat special
tokens carry norms 10-100x larger and would otherwise set the constant (pitfalls.md). The factor
is recorded in cfg.json and folded into the saved weights, so checkpoints act on raw activations.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fast_sae.actcache import ActivationCache, CacheError


def scale_factor(cache: ActivationCache, layer: int, method: str) -> float:
    """Multiplier s applied to raw activations: x_train = s * x_raw."""
    if method == "none":
        return 1.0
    stats = cache.layer_stats(layer)
    msn = stats.mean_sq_norm
    if method == "content" and stats.mean_sq_norm_content:
        msn = stats.mean_sq_norm_content
    if not msn or not math.isfinite(msn) or msn <= 0:
        raise CacheError(f"{cache.path}: layer {layer} has mean squared norm {msn!r}; cannot normalise")
    return math.sqrt(cache.meta.d_model / msn)


def normalization_method_used(cache: ActivationCache, layer: int, method: str) -> str:
    if method == "content" and not cache.layer_stats(layer).mean_sq_norm_content:
        return "all"  # no content tokens in this cache: fall back to all tokens
    return method


def geometric_median(points: torch.Tensor, maxiter: int = 100, ftol: float = 1e-20) -> torch.Tensor:
    """Weiszfeld iterations as in SAELens (fast-paper.md §3.2), computed in float64."""
    p = points.to(torch.float64)
    weights = torch.ones(len(p), dtype=torch.float64)
    median = (weights[:, None] * p).sum(0) / weights.sum()
    objective = torch.linalg.vector_norm(p - median, dim=1).mul(weights).sum()
    for _ in range(maxiter):
        prev = objective
        dist = torch.linalg.vector_norm(p - median, dim=1)
        w = weights / dist.clamp_min(1e-6)
        median = (w[:, None] * p).sum(0) / w.sum()
        objective = torch.linalg.vector_norm(p - median, dim=1).mul(weights).sum()
        if abs(float(objective - prev)) <= ftol * float(objective):
            break
    return median.to(torch.float32)


def initial_b_dec(method: str, sample: np.ndarray, mean: np.ndarray, scale: float) -> torch.Tensor:
    """b_dec at start, in normalised units: geometric median of ``sample`` (already normalised),
    the cache's stored mean, or zeros."""
    if method == "zeros":
        return torch.zeros(sample.shape[1], dtype=torch.float32)
    if method == "mean":
        return torch.from_numpy((mean * scale).astype(np.float32))
    return geometric_median(torch.from_numpy(sample))
