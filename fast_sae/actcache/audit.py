"""Whole-cache checks and the summary ``pipeline.py info`` prints.

Why apart from the reader: these walk every file of a cache (``--verify`` reads it all), which no
training or evaluation read path does; the reader keeps to what those paths need.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import layout
from .commits import read_records
from .integrity import check_finite, checksum
from .layout import CacheError

if TYPE_CHECKING:
    from .reader import ActivationCache


def verify_all(cache: ActivationCache, progress: Any = None) -> int:
    """Check every activation chunk (size, checksum, decode, finite) and every statistics file;
    returns the number of files checked. For ``pipeline.py info --verify``."""
    n = 0
    for layer in cache.meta.layers:
        for index in range(cache.n_chunks):
            try:
                before = os.stat(str(cache.chunk_file(layer, index))) if cache.local else None
            except OSError:
                before = None  # _load reports the missing file
            rows = cache._load(layer, index)
            if before is not None:  # this process hashed the file: later readers need not (trusted.py)
                cache.record_verified(layer, index, before)
            check_finite(rows, str(cache.chunk_file(layer, index)), index * cache.meta.chunk_tokens)
            n += 1
            if progress is not None:
                progress(1)
    if cache.meta.format_version >= 2:
        records = read_records(cache.store, list(range(cache.n_chunks)))
        for i in range(cache.n_chunks):
            if i not in records:
                raise CacheError(f"{cache.store.where(layout.commit_key(i))}: commit record missing")
            for key, (nbytes, digest) in records[i].files.items():
                if "/acts/" in f"/{key}":
                    continue
                data = cache.store.get_checked(key, nbytes)
                if checksum(data) != digest:
                    raise CacheError(f"{cache.store.where(key)}: checksum mismatch (recorded {digest}, read "
                                     f"{checksum(data)}); the file is corrupt")
                n += 1
    for layer in cache.meta.layers:
        if cache.complete:
            cache.layer_stats(layer)
    return n


def summary(cache: ActivationCache) -> dict[str, Any]:
    m = cache.meta
    roles = cache.roles()
    counts = {layout.ROLE_NAMES.get(int(k), f"code {int(k)}"): int(v)
              for k, v in zip(*np.unique(roles, return_counts=True))}
    return {
        "path": str(cache.path), "format_version": m.format_version, "complete": cache.complete,
        "progress": cache.progress_text(), "tokens_committed": cache.tokens_committed,
        "model": m.model_id, "regime": m.regime, "layers": m.layers, "d_model": m.d_model,
        "n_tokens": m.n_tokens, "n_sequences": m.n_sequences, "context_size": m.context_size,
        "dtype": m.dtype, "compression": m.compression, "chunk_tokens": m.chunk_tokens,
        "dataset": m.dataset, "dataset_fingerprint": m.dataset_fingerprint,
        "chat_template_hash": m.chat_template_hash, "token_stream_hash": m.token_stream_hash, "roles": counts,
        "bytes_on_disk": sum(cache.store.list().values()),
        "stats": cache.attrs.get("stats"),
    }
