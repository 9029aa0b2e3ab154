"""Whole-cache checks and the summary ``pipeline.py info`` prints.

Why apart from the reader: these walk every file of a cache (``--verify`` reads it all), which no
training or evaluation read path does; the reader keeps to what those paths need.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import layout
from .commits import ChunkRecord, chunk_files, read_records
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
            check_record(cache, records[i])
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


def check_record(cache: ActivationCache, rec: ChunkRecord) -> None:
    """A commit record agrees with the cache: its chunk index, its row count (from n_tokens and
    chunk_tokens), the files it names, and (complete caches) the size and checksum the index arrays
    hold for each activation chunk. A record edited by hand fails here with the field named."""
    i = rec.index
    where = cache.store.where(layout.commit_key(i))
    if rec.rows != cache.chunk_rows(i):
        raise CacheError(f"{where}: field 'rows' is {rec.rows}, but chunk {i} holds {cache.chunk_rows(i)} tokens "
                         f"(n_tokens {cache.meta.n_tokens}, chunk_tokens {cache.meta.chunk_tokens}); the record is "
                         f"corrupt")
    expected = set(chunk_files(cache.meta, i))
    if set(rec.files) != expected:
        odd = sorted(set(rec.files) ^ expected)
        raise CacheError(f"{where}: field 'files' does not name the chunk's files (e.g. {odd[0]}); the record is "
                         f"corrupt")
    if cache.complete:
        for layer in cache.meta.layers:
            key = cache.chunk_key(layer, i)
            nbytes, digest = cache.expected(layer, i)
            if rec.files[key] != (nbytes, f"{digest:016x}" if digest is not None else rec.files[key][1]):
                raise CacheError(f"{where}: field 'files' gives {key} as {list(rec.files[key])}, the cache's index "
                                 f"{[nbytes, f'{digest:016x}' if digest is not None else None]}; the record is "
                                 f"corrupt")


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
