"""Per-layer activation statistics, computed in one float64 pass over the finished cache.

Why a separate pass rather than running sums during the harvest: the pass is deterministic and
independent of how a harvest was interrupted and resumed, so resumed caches stay byte-identical.
The content-only mean squared norm is kept beside the all-token one because chat special tokens
carry very large norms and would otherwise dominate any normalisation constant (pitfalls.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .layout import CONTENT_ROLES

if TYPE_CHECKING:
    from .reader import ActivationCache


def compute_layer_stats(cache: ActivationCache, layer: int, roles: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    d = cache.d_model
    total = np.zeros(d, dtype=np.float64)
    sq = 0.0
    sq_content = 0.0
    n_content = 0
    norms = []
    content = np.isin(roles, np.array([int(r) for r in CONTENT_ROLES], dtype=roles.dtype))
    for start, block in cache.iter_chunks(layer):
        x = np.asarray(block, dtype=np.float64)
        total += x.sum(axis=0)
        row_sq = np.einsum("ij,ij->i", x, x)
        sq += float(row_sq.sum())
        mask = content[start:start + len(x)]
        sq_content += float(row_sq[mask].sum())
        n_content += int(mask.sum())
        norms.append(np.sqrt(row_sq).astype(np.float32))
    n = cache.n_tokens
    mean = total / max(n, 1)
    all_norms = np.concatenate(norms) if norms else np.zeros(0, np.float32)
    mean_sq = sq / max(n, 1)
    return mean, {
        "mean_sq_norm": mean_sq,
        "mean_sq_norm_content": (sq_content / n_content) if n_content else None,
        "median_norm": float(np.median(all_norms)) if n else 0.0,
        "max_norm": float(all_norms.max()) if n else 0.0,
        "mean_sq_centered": mean_sq - float(mean @ mean),
        "n_tokens": n,
        "n_content_tokens": n_content,
    }
