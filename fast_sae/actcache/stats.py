"""Per-layer activation statistics, aggregated from per-chunk partials in float64.

Why partials: a cache can be terabytes in an object store, written by many workers; re-reading it
all to finish would cost as much as writing it. So each committed chunk stores the sum of its rows
(float64), the norm of each row (float32) and its sums of squares, and the finishing step adds the
partials in chunk order: the same numbers whichever worker wrote which chunk, and the same
operations, in the same order, as one pass over the whole cache. The content-only mean squared
norm is kept beside the all-token one because chat special tokens carry very large norms and would
otherwise dominate any normalisation constant.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import layout
from .commits import ChunkRecord
from .integrity import checksum, decode_chunk
from .layout import CacheError, CacheMeta
from .store import LocalStore, Store


def aggregate(store: Store, meta: CacheMeta, records: dict[int, ChunkRecord], roles: np.ndarray,
              threads: int = 8) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Per-layer mean and statistics of the whole cache from the chunks' partials, summed in chunk
    order (so the result does not depend on which worker wrote which chunk), reading each partial
    through its checksum."""
    n, d, c = meta.n_tokens, meta.d_model, meta.chunk_tokens
    n_chunks = -(-n // c)

    def fetch(key_index: tuple[str, int]) -> bytes | memoryview:
        key, i = key_index
        nbytes, digest = records[i].files[key]

        def check(data: bytes | memoryview) -> None:
            if checksum(data) != digest:
                raise CacheError(f"{store.where(key)}: checksum mismatch (stored {digest}, read {checksum(data)})")
        return store.get_checked(key, nbytes, check)

    means: dict[int, np.ndarray] = {}
    stats: dict[str, Any] = {}
    content = np.isin(roles, np.array([int(r) for r in layout.CONTENT_ROLES], dtype=roles.dtype))
    n_content_total = int(content.sum())
    pool = ThreadPoolExecutor(1 if isinstance(store, LocalStore) else threads)
    try:
        for layer in meta.layers:
            sums_keys = [(layout.chunk_key(layout.chunk_sum_path(layer), i), i) for i in range(n_chunks)]
            norm_keys = [(layout.vector_chunk_key(layout.norm_path(layer), i), i) for i in range(n_chunks)]
            total = np.zeros(d, dtype=np.float64)
            for key_index, data in zip(sums_keys, pool.map(fetch, sums_keys)):
                total += decode_chunk(data, 1, d, "float64", "none", store.where(key_index[0]))[0]
            norms = np.empty(n, dtype=np.float32)
            for (key, i), data in zip(norm_keys, pool.map(fetch, norm_keys)):
                rows = min(c, n - i * c)
                norms[i * c:i * c + rows] = decode_chunk(data, rows, 1, "float32", "none", store.where(key))[:, 0]
            sq = sq_content = 0.0
            for i in range(n_chunks):
                s = records[i].stats[str(layer)]
                sq += s["sq"]
                sq_content += s["sq_content"]
            mean = total / max(n, 1)
            mean_sq = sq / max(n, 1)
            means[layer] = mean
            stats[str(layer)] = {
                "mean_sq_norm": mean_sq,
                "mean_sq_norm_content": (sq_content / n_content_total) if n_content_total else None,
                "median_norm": float(np.median(norms)) if n else 0.0,
                "max_norm": float(norms.max()) if n else 0.0,
                "mean_sq_centered": mean_sq - float(mean @ mean),
                "n_tokens": n,
                "n_content_tokens": n_content_total,
            }
    finally:
        pool.shutdown()
    return means, stats


def chunk_partials(rows: np.ndarray, content: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(sum of rows, norm of each row, scalars) of one chunk, in float64 like the whole-cache statistics."""
    x = np.asarray(rows, dtype=np.float64)
    row_sq = np.einsum("ij,ij->i", x, x)
    scalars = {"sq": float(row_sq.sum()), "sq_content": float(row_sq[content].sum()),
               "n_content": float(content.sum())}
    return x.sum(axis=0), np.sqrt(row_sq).astype(np.float32), scalars
