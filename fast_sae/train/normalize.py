"""Activation normalisation constants and the decoder-bias initial value.

Why normalise at all (the paper trains on raw residuals): one set of hyper-parameters then fits
every layer and model, whose residual norms differ by orders of magnitude. The factor s makes
E||s x||^2 = d_model over a robust statistic of *training* tokens, fixed before training starts
and identical on every process; it is recorded in cfg.json and folded into the saved weights, so
checkpoints act on raw activations.

The statistic (``robust_mean_sq_norm``), and why each exclusion:
- training tokens only (the run's training range, or all of a ``--normalize-from`` cache): a
  held-out token must not shape training, not even through one constant;
- no position 0 of any sequence: it is an attention sink (on the embedded model ||x|| ~ 25,000
  against a median of ~175); in a BT block the first token is a sink too, wherever the block
  starts, so a statistic with it differs ~30x between FAST and BT caches of the same data;
- no norm outliers: tokens with ||x|| > 10x the sample's median norm (other sinks);
- ``content``: only content tokens (system/user/assistant/text), not template tokens; ``all``:
  every role. Both after the exclusions above.
A deterministic sample (fixed seed, at most ``NORM_SAMPLE_TOKENS`` tokens, without replacement)
keeps the cost bounded on large caches. A comparison of regimes takes one shared constant from
one training cache (``--normalize-from``), so "the same coefficient" means the same pressure in
raw units for every regime.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import CONTENT_ROLES, ActivationCache, CacheError
from fast_sae.saeio import Normalization

from .export import cache_record
from .loader import LayerReader

NORM_SAMPLE_TOKENS = 262_144
NORM_SAMPLE_SEED = 0  # fixed: the constant is a property of the cache and token range, not of the run's seed
OUTLIER_FACTOR = 10.0
_READ_BLOCK = 16_384


def sample_indices(start: int, stop: int, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` distinct token indices of [start, stop), drawn with ``seed``, sorted (all if fewer)."""
    count = stop - start
    if count <= n:
        return np.arange(start, stop, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=n, replace=False)).astype(np.int64) + start


def robust_mean_sq_norm(cache: ActivationCache, layer: int, token_range: tuple[int, int], method: str,
                        sample_tokens: int = NORM_SAMPLE_TOKENS) -> dict[str, Any]:
    """Mean squared norm over a sample of ``token_range`` without sinks and outliers (module docstring)."""
    idx = sample_indices(token_range[0], token_range[1], sample_tokens, NORM_SAMPLE_SEED)
    reader = LayerReader(cache, layer, 1.0)
    sq = np.empty(len(idx), dtype=np.float64)
    for lo in range(0, len(idx), _READ_BLOCK):
        rows = reader.gather(idx[lo:lo + _READ_BLOCK]).astype(np.float64)
        sq[lo:lo + len(rows)] = np.einsum("ij,ij->i", rows, rows)
    not_first = cache.positions()[idx] != 0
    norms = np.sqrt(sq)
    median = float(np.median(norms[not_first])) if not_first.any() else 0.0
    inlier = not_first & (norms <= OUTLIER_FACTOR * median)
    content = np.isin(cache.roles()[idx], [int(r) for r in CONTENT_ROLES])
    used_method = method
    keep = inlier & content if method == "content" else inlier
    if method == "content" and not keep.any():
        used_method, keep = "all", inlier  # no content tokens (e.g. a special-token-only cache)
    return {"method": used_method, "mean_sq_norm": float(sq[keep].mean()) if keep.any() else None,
            "n_sampled": int(len(idx)), "n_used": int(keep.sum()), "excluded_position0": int((~not_first).sum()),
            "excluded_outliers": int((not_first & ~inlier).sum()), "excluded_roles": int((inlier & ~keep).sum())}


def normalization_source(path: str, train_cache: ActivationCache, train_range: tuple[int, int],
                         layers: list[int]) -> tuple[ActivationCache, tuple[int, int]]:
    """The cache (and its token range) a ``--normalize-from`` run takes its constant from.

    The training cache itself gives its training range; another cache gives all its tokens, so it
    must be a training cache: a held-out (``--docs holdout``) cache is refused.
    """
    source = ActivationCache.open(path)
    if source.path.resolve() == train_cache.path.resolve():
        return train_cache, train_range
    if source.d_model != train_cache.d_model:
        raise CacheError(f"--normalize-from {path}: d_model {source.d_model}, the training cache has "
                         f"{train_cache.d_model}")
    missing = [layer for layer in layers if layer not in source.meta.layers]
    if missing:
        raise CacheError(f"--normalize-from {path}: layer {missing[0]} not in that cache (layers {source.meta.layers})")
    if source.meta.document_set()["docs"] == "holdout":
        raise CacheError(f"--normalize-from {path}: a held-out evaluation cache (--docs holdout); the constant must "
                         f"come from training tokens: pass a training cache")
    return source, (0, source.n_tokens)


def normalization(cache: ActivationCache, layer: int, method: str, token_range: tuple[int, int],
                  sample_tokens: int = NORM_SAMPLE_TOKENS) -> Normalization:
    """The factor s with E||s x||^2 = d_model over ``robust_mean_sq_norm`` of ``token_range`` (or 1 for none)."""
    if method == "none":
        return Normalization(method="none", requested="none", factor=1.0, layer=layer, statistic=None)
    if layer not in cache.meta.layers:
        raise CacheError(f"{cache.path}: layer {layer} not in the cache (layers {cache.meta.layers}); "
                         f"cannot take the normalisation from it")
    if not 0 <= token_range[0] < token_range[1] <= cache.n_tokens:
        raise CacheError(f"{cache.path}: token range {list(token_range)} outside its {cache.n_tokens} tokens")
    st = robust_mean_sq_norm(cache, layer, token_range, method, sample_tokens)
    msn = st.pop("mean_sq_norm")
    if not msn or not math.isfinite(msn) or msn <= 0:
        raise CacheError(f"{cache.path}: layer {layer} has mean squared norm {msn!r} over its "
                         f"{st['n_used']} usable tokens; cannot normalise (use --normalize none)")
    roles = "content tokens" if st["method"] == "content" else "tokens of every role"
    statistic = (f"mean ||x||^2 over {roles} at positions > 0 with ||x|| <= {OUTLIER_FACTOR:g} x the median norm, "
                 f"in a seeded sample of at most {sample_tokens} tokens of the source's token range")
    return Normalization(method=st.pop("method"), requested=method, factor=math.sqrt(cache.meta.d_model / msn),
                         layer=layer, source=cache_record(cache),
                         source_token_range=(int(token_range[0]), int(token_range[1])),
                         statistic=statistic, mean_sq_norm=msn, **st)


def geometric_median(points: torch.Tensor, maxiter: int = 100, ftol: float = 1e-20) -> torch.Tensor:
    """Weiszfeld iterations as in SAELens (docs/method.md §3), computed in float64."""
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
