"""Per-chunk commit records (format version 2) and what is built from them when a cache completes.

Why per chunk and not one watermark: several workers write one cache, each its own chunks, in no
common order, and an object store has no atomic read-modify-write of a shared file. So each chunk
gets its own small record, ``commits/{i}.json``, written only after every file of that chunk is
stored: the stored size and xxh3-64 of each file, and the chunk's statistics partials. Chunk i is
done when its record exists and every file it names is present with the recorded size. The record
holds nothing about who wrote it or when, so any mix of workers, kills and restarts leaves the same
bytes as one uninterrupted harvest.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import layout
from .layout import CacheError, CacheMeta
from .store import KeyMissing, LocalStore, Store


@dataclass
class ChunkRecord:
    index: int
    rows: int
    files: dict[str, tuple[int, str]]  # key -> (stored bytes, xxh3-64 hex)
    stats: dict[str, dict[str, float]]  # layer -> {sq, sq_content, n_content}

    def to_bytes(self) -> bytes:
        doc = {"chunk": self.index, "rows": self.rows, "files": {k: list(v) for k, v in sorted(self.files.items())},
               "stats": {k: self.stats[k] for k in sorted(self.stats, key=int)}}
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, where: str) -> ChunkRecord:
        try:
            doc = json.loads(bytes(data))
            files = {str(k): (_count(v[0], "files"), _hex(v[1])) for k, v in doc["files"].items()}
            return cls(_count(doc["chunk"], "chunk"), _count(doc["rows"], "rows"), files,
                       {str(k): {kk: float(vv) for kk, vv in v.items()} for k, v in doc["stats"].items()})
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CacheError(f"{where}: corrupt commit record ({exc})") from None


def _count(value: object, field: str) -> int:
    """A JSON integer >= 0 (not a bool, a float or a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"field {field!r} is {value!r}, expected a non-negative integer")
    return value


def _hex(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16}", value):
        raise ValueError(f"checksum {str(value)[:20]!r}, expected 16 hex digits")
    return value


def chunk_files(meta: CacheMeta, index: int) -> list[str]:
    """Every file of chunk ``index``: the activations and statistics partials of each layer."""
    out = []
    for layer in meta.layers:
        out += [layout.chunk_key(layout.acts_path(layer), index), layout.chunk_key(layout.chunk_sum_path(layer), index),
                layout.vector_chunk_key(layout.norm_path(layer), index)]
    return out


def committed_indices(store: Store) -> set[int]:
    """Chunk indices that have a commit record (not yet checked against their files)."""
    out = set()
    for key in store.list(layout.COMMITS):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isascii() and name[:-5].isdigit():
            out.add(int(name[:-5]))
    return out


def read_records(store: Store, indices: list[int], threads: int = 16) -> dict[int, ChunkRecord]:
    """The commit records of ``indices`` (missing ones are left out)."""
    def one(i: int) -> ChunkRecord | None:
        key = layout.commit_key(i)
        try:
            data = store.retrying(lambda: store.get(key), key)
        except KeyMissing:
            return None
        return ChunkRecord.from_bytes(data, store.where(key))
    if isinstance(store, LocalStore) or len(indices) < 4:
        found = [one(i) for i in indices]
    else:
        with ThreadPoolExecutor(threads) as pool:
            found = list(pool.map(one, indices))
    return {r.index: r for r in found if r is not None}


def done_chunks(store: Store, meta: CacheMeta, indices: list[int]) -> tuple[dict[int, ChunkRecord], list[int]]:
    """(records of the chunks among ``indices`` that are done, indices whose record names a missing or
    wrong-size file: damage after the commit, to be redone)."""
    wanted = sorted(set(indices) & committed_indices(store))
    records = read_records(store, wanted)
    sizes: dict[str, int] = {}
    if not isinstance(store, LocalStore):
        for layer in meta.layers:  # one listing per array instead of one request per file
            for array in (layout.acts_path(layer), layout.chunk_sum_path(layer), layout.norm_path(layer)):
                sizes.update(store.list(array))
    done, damaged = {}, []
    for i, rec in records.items():
        expected = set(chunk_files(meta, i))
        ok = set(rec.files) == expected and rec.index == i
        for key, (nbytes, _) in rec.files.items():
            size = store.size(key) if isinstance(store, LocalStore) else sizes.get(key)
            ok = ok and size == nbytes
        if ok:
            done[i] = rec
        else:
            damaged.append(i)
    return done, damaged
