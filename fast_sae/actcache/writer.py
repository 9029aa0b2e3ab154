"""Resumable, shareable writer of the activation cache (format version 2).

Why it looks like this: a harvest may be killed at any point (pre-empted GPU, Ctrl-C, OOM), several
workers may write one cache at once (``--worker I/N``, torchrun), and the result must be the bytes
one uninterrupted harvest writes. So
- the token stream (ids, positions, roles, sequence starts) and all metadata are written first and
  made visible in one step (create.py): a cache that exists has its complete token stream;
- the unit of work is one activation chunk. A worker owns a contiguous range of chunk indices,
  receives the rows of every forward batch that overlaps its pending chunks, and commits a chunk
  once it has all its rows: the file of every layer, its statistics partials, then its commit
  record (commits.py). Nothing else is shared between workers;
- whoever finds every chunk committed (the last worker, or ``harvest --finalize``) aggregates the
  statistics from the partials, writes the checksum index, and marks the cache complete.
"""
from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .commits import ChunkRecord, committed_indices, done_chunks
from .create import create_cache, token_stream_hash
from .integrity import as_bytes, checksum, encode_chunk
from .layout import CacheError, CacheMeta
from .locking import ChunkLock
from .stats import aggregate, chunk_partials
from .store import LocalStore, RemotePath, Store, open_store
from .trusted import VerifiedRecord


@dataclass
class TokenArrays:
    """The token stream of a cache, one entry per stored token (and n_seq + 1 sequence starts)."""

    ids: np.ndarray  # int32
    positions: np.ndarray  # int32, position inside its sequence (restarts at 0)
    roles: np.ndarray  # uint8, layout.Role
    doc_ids: np.ndarray  # int32, index of the source sample in the dataset
    seq_starts: np.ndarray  # int64, n_seq + 1 offsets into the token arrays

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("positions", "roles", "doc_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"token arrays: {name} has {len(getattr(self, name))} entries, ids has {n}")
        if len(self.seq_starts) == 0 or self.seq_starts[0] != 0 or self.seq_starts[-1] != n:
            raise ValueError("token arrays: seq_starts must run from 0 to the number of tokens")

    def digest(self) -> str:
        return token_stream_hash(self.ids, self.positions, self.roles, self.doc_ids, self.seq_starts)


def parse_worker(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    left, sep, right = str(text).partition("/")
    if not sep or not re.fullmatch(r"[0-9]+", left.strip()) or not re.fullmatch(r"[0-9]+", right.strip()):
        raise CacheError(f"--worker {text!r}: expected I/N, e.g. 0/4")
    i, n = int(left), int(right)
    if n < 1 or not 0 <= i < n:
        raise CacheError(f"--worker {text!r}: expected 0 <= I < N")
    return i, n


def worker_share(n_chunks: int, worker: tuple[int, int]) -> range:
    """The contiguous chunk indices worker I of N writes (contiguous: only the batches at the two ends
    of a share are computed by two workers)."""
    i, n = worker
    return range(i * n_chunks // n, (i + 1) * n_chunks // n)


# Fields of the metadata that fix the bytes: a resume or another worker must agree on every one.
IDENTITY = ("n_tokens", "n_sequences", "dataset_fingerprint", "chat_template_hash", "token_stream_hash", "d_model",
            "layers", "dtype", "chunk_tokens", "compression", "model_id", "model_revision")


def read_root(store: Store) -> dict[str, Any]:
    """The attributes of the cache's root ``zarr.json`` (one line naming the file on any damage)."""
    where = store.where("zarr.json")
    try:
        data = store.retrying(lambda: store.get("zarr.json"), "zarr.json")
    except CacheError as exc:
        if "missing" in str(exc):
            raise CacheError(f"{where}: missing; {store.location} is not a zarr v3 activation cache") from None
        raise
    try:
        doc = json.loads(bytes(data))
    except ValueError as exc:
        raise CacheError(f"{where}: unreadable or corrupt JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes") or {}, dict):
        raise CacheError(f"{where}: not a zarr v3 group document")
    return doc


class CacheWriter:
    """Writes the activations of a known token stream into its chunks, for one worker's share."""

    def __init__(self, store: Store, meta: CacheMeta, roles: np.ndarray, share: range, pending: list[int],
                 lock: ChunkLock | None, threads: int) -> None:
        self.store = store
        self.path = store.location
        self.meta = meta
        self.share = share
        self.pending = pending  # chunk indices of the share still to write, ascending
        self._roles = roles
        self._content = np.isin(roles, np.array([int(r) for r in layout.CONTENT_ROLES], dtype=roles.dtype))
        self._lock = lock
        self._open: dict[int, dict[int, np.ndarray]] = {}  # chunk -> layer -> rows being assembled
        self._filled: dict[int, int] = {}
        self._want = set(pending)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-commit")
        self._slots = threading.Semaphore(threads + 2)  # bounds the chunks held in memory while committing
        self._futures: list[Future] = []
        self.committed = 0  # chunks committed by this writer
        self._verified_record: VerifiedRecord | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, where: str | Path | RemotePath, meta: CacheMeta, tokens: TokenArrays, tokenizer: Any | None = None,
             worker: tuple[int, int] = (0, 1), options: dict[str, str] | None = None,
             log: Any = print) -> CacheWriter:
        """Create the cache (token stream first) or join the existing one after checking that it was
        made from the same data and arguments; lock this worker's share (local caches)."""
        store = open_store(where, options)
        meta.token_stream_hash = tokens.digest()
        if not _exists(store):
            if create_cache(store, meta, tokens, tokenizer):
                log(f"{store.location}: created ({meta.n_tokens} tokens, {meta.n_sequences} sequences)")
        complete = _check_identity(store, meta)
        if complete:
            _check_sizes(store, meta)
        n_chunks = -(-meta.n_tokens // meta.chunk_tokens)
        share = worker_share(n_chunks, worker)
        lock = None
        if isinstance(store, LocalStore):
            store.sweep_tmp()
            what = f"worker {worker[0]}/{worker[1]}'s share" if worker[1] > 1 else "this cache"
            lock = ChunkLock(store.root, share.start, share.stop, what)
        try:
            done, damaged = ({}, []) if complete else done_chunks(store, meta, list(share))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if damaged:
            log(f"{store.location}: chunks {damaged[:5]}{' ...' if len(damaged) > 5 else ''} have a commit record "
                f"but a missing or wrong-size file; rewriting them")
        pending = [] if complete else [i for i in share if i not in done]
        threads = 1 if isinstance(store, LocalStore) else 4
        return cls(store, meta, tokens.roles, share, pending, lock, threads)

    @classmethod
    def create_or_resume(cls, path: str | Path | RemotePath, meta: CacheMeta, tokens: TokenArrays,
                         tokenizer: Any | None = None) -> CacheWriter:
        """A single writer of the whole cache (worker 0/1)."""
        return cls.open(path, meta, tokens, tokenizer, log=lambda *_: None)

    @property
    def complete(self) -> bool:
        return bool(read_root(self.store).get("attributes", {}).get("complete"))

    def chunk_range(self, index: int) -> tuple[int, int]:
        c = self.meta.chunk_tokens
        return index * c, min((index + 1) * c, self.meta.n_tokens)

    def wants(self, start: int, end: int) -> bool:
        """Whether tokens [start, end) overlap a chunk this writer still has to write."""
        c = self.meta.chunk_tokens
        return any(i in self._want for i in range(start // c, (end - 1) // c + 1)) if end > start else False

    # ------------------------------------------------------------------ writing
    def write(self, start: int, acts: dict[int, np.ndarray]) -> None:
        """Take the activations of tokens [start, start + len): rows of pending chunks are kept, the rest
        dropped; a chunk is committed (in the background) as soon as all its rows have arrived."""
        self._raise_if_failed()
        length = len(next(iter(acts.values())))
        for layer in self.meta.layers:
            if acts[layer].shape != (length, self.meta.d_model):
                raise CacheError(f"{self.path}: layer {layer} block has shape {acts[layer].shape}, "
                                 f"expected ({length}, {self.meta.d_model})")
        end = start + length
        c = self.meta.chunk_tokens
        for index in range(start // c, (end - 1) // c + 1 if end > start else start // c):
            if index not in self._want:
                continue
            lo, hi = self.chunk_range(index)
            a, b = max(lo, start), min(hi, end)
            filled = self._filled.get(index, 0)
            if b <= lo + filled:
                continue  # rows already there
            if a > lo + filled:
                raise CacheError(f"{self.path}: activations for token {a} arrive before token {lo + filled}")
            a = lo + filled
            if index not in self._open:
                self._open[index] = {layer: np.empty((hi - lo, self.meta.d_model), dtype=self.meta.dtype)
                                     for layer in self.meta.layers}
            for layer in self.meta.layers:
                self._open[index][layer][a - lo:b - lo] = acts[layer][a - start:b - start]
            self._filled[index] = b - lo
            if b == hi:
                self._submit(index)

    def _submit(self, index: int) -> None:
        rows = self._open.pop(index)
        self._filled.pop(index)
        self._want.discard(index)
        self._slots.acquire()
        fut = self._pool.submit(self._commit, index, rows)
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)

    def _commit(self, index: int, rows: dict[int, np.ndarray]) -> None:
        """Store every file of chunk ``index``, then its record (the record makes it done)."""
        m = self.meta
        lo, hi = self.chunk_range(index)
        files: dict[str, tuple[int, str]] = {}
        stats: dict[str, dict[str, float]] = {}
        for layer in m.layers:
            x = rows[layer]
            sums, norms, scalars = chunk_partials(x, self._content[lo:hi])
            if not np.isfinite(sums).all():  # a NaN/inf anywhere in the chunk makes its row sum non-finite
                bad = lo + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
                raise CacheError(f"{self.path}: layer {layer} activation of token {bad} is not finite"
                                 + (" (float16 overflows above 65504: use --dtype float32)" if m.dtype == "float16"
                                    else "") + "; nothing was committed for that chunk")
            padded = np.zeros(m.chunk_tokens, dtype="<f4")
            padded[:len(norms)] = norms
            for key, data in ((layout.chunk_key(layout.acts_path(layer), index),
                               encode_chunk(x, m.chunk_tokens, m.dtype, m.compression)),
                              (layout.chunk_key(layout.chunk_sum_path(layer), index),
                               as_bytes(np.ascontiguousarray(sums, "<f8"))),
                              (layout.vector_chunk_key(layout.norm_path(layer), index), as_bytes(padded))):
                self.store.put(key, data)
                files[key] = (len(data), checksum(data))
                if "/acts/" in f"/{key}":
                    self._record_written(key, files[key][1])
            stats[str(layer)] = scalars
        record = ChunkRecord(index, hi - lo, files, stats)
        self.store.put(layout.commit_key(index), record.to_bytes())

    def _record_written(self, key: str, digest: str) -> None:
        """A local chunk file just written from bytes of this digest counts as verified (trusted.py)."""
        if not isinstance(self.store, LocalStore):
            return
        if self._verified_record is None:
            self._verified_record = VerifiedRecord(self.store.root)
        path = self.store.root / key
        try:
            st = os.stat(path)
        except OSError:
            return
        self._verified_record.add(key, st, path, int(digest, 16))

    def _raise_if_failed(self) -> None:
        for fut in [f for f in self._futures if f.done()]:
            exc = fut.exception()
            if exc is not None:
                self.close()
                if isinstance(exc, CacheError):
                    raise CacheError(str(exc)) from None
                raise CacheError(f"{self.path}: writing activations failed: {exc}") from exc
            self._futures.remove(fut)
            self.committed += 1

    def flush_wait(self) -> None:
        """Block until every submitted chunk is stored."""
        for fut in list(self._futures):
            fut.exception()
        self._raise_if_failed()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ completing
    def missing_chunks(self) -> list[int]:
        n_chunks = -(-self.meta.n_tokens // self.meta.chunk_tokens)
        have = committed_indices(self.store)
        return [i for i in range(n_chunks) if i not in have]

    def finalize(self) -> dict[str, Any]:
        """Check every chunk is done, aggregate the statistics, write the checksum index and mark the
        cache complete. Idempotent: two finishers write the same bytes."""
        self.flush_wait()
        if self._open:
            first = min(self._open)
            raise CacheError(f"{self.path}: chunk {first} is incomplete: its rows did not all arrive")
        return finalize_cache(self.store, self.meta, self._roles)

    def finish(self) -> dict[str, Any]:
        """Single-writer convenience: wait for the commits, finalize, release."""
        try:
            return self.finalize()
        finally:
            self.close()


def _exists(store: Store) -> bool:
    if isinstance(store, LocalStore):
        if store.root.exists() and not store.root.is_dir():
            raise CacheError(f"{store.root}: exists and is not a folder")
        return store.root.is_dir() and any(store.root.iterdir())
    return store.exists("zarr.json")


def _check_identity(store: Store, meta: CacheMeta) -> bool:
    """Whether the cache is complete, after checking that it is what ``meta`` would write; else one line."""
    doc = read_root(store)
    attrs = doc.get("attributes") or {}
    where = store.where("zarr.json")
    old = CacheMeta.from_attrs(attrs, where)
    if old.format_version != layout.FORMAT_VERSION:
        raise CacheError(f"{store.location}: format version {old.format_version} cache (an older fast-sae); it can "
                         f"be read but not resumed or extended here; harvest into a new --out")
    diff = _diff(old.harvest_args, meta.harvest_args)
    if diff is not None:
        raise CacheError(f"{store.location}: cache was made with different arguments: {diff}; use another --out "
                         f"or delete it")
    for key in IDENTITY:
        a, b = getattr(old, key), getattr(meta, key)
        if a != b:
            why = {"dataset_fingerprint": "the dataset changed", "token_stream_hash": "the token stream changed",
                   "chat_template_hash": "the chat template changed", "n_tokens": "the dataset changed"}.get(key, "")
            raise CacheError(f"{where}: {key} is {a!r} in the cache but {b!r} now"
                             + (f" ({why})" if why else "") + "; use another --out")
    return bool(attrs.get("complete"))


def _check_sizes(store: Store, meta: CacheMeta) -> None:
    """A complete cache whose chunk files are missing or of the wrong size is damaged: say which."""
    from .reader import ActivationCache

    cache = ActivationCache.open(store.location, require_complete=False, options=None, verify=False) \
        if isinstance(store, LocalStore) else None
    if cache is None:
        return  # remote: reads check every chunk's size and checksum; `info --verify` checks them all
    for layer in meta.layers:
        for index in range(cache.n_chunks):
            nbytes, _ = cache.expected(layer, index)
            size = store.size(cache.chunk_key(layer, index))
            if size != nbytes:
                what = "missing" if size is None else f"{size} bytes, expected {nbytes}"
                raise CacheError(f"{cache.chunk_file(layer, index)}: chunk file {what}; the cache is truncated or "
                                 f"corrupt")


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key} (cache: {old.get(key)!r}, now: {new.get(key)!r})"
    return None


def finalize_cache(store: Store, meta: CacheMeta, roles: np.ndarray) -> dict[str, Any]:
    """Aggregate statistics, write the index of chunk checksums and mark the cache complete."""
    doc = read_root(store)
    if (doc.get("attributes") or {}).get("complete"):
        return doc["attributes"].get("stats") or {}
    n_chunks = -(-meta.n_tokens // meta.chunk_tokens)
    done, damaged = done_chunks(store, meta, list(range(n_chunks)))
    missing = [i for i in range(n_chunks) if i not in done]
    if missing:
        raise CacheError(f"{store.location}: {len(missing)} of {n_chunks} chunks are not done (first: chunk "
                         f"{missing[0]}, tokens {missing[0] * meta.chunk_tokens}..); run the workers that own them "
                         f"(same command, their --worker I/N) before finishing")
    means, stats = aggregate(store, meta, done, roles)
    nbytes = np.zeros((n_chunks, len(meta.layers)), dtype=np.int64)
    digests = np.zeros((n_chunks, len(meta.layers)), dtype=np.uint64)
    for i, rec in done.items():
        for j, layer in enumerate(meta.layers):
            nb, digest = rec.files[layout.chunk_key(layout.acts_path(layer), i)]
            nbytes[i, j] = nb
            digests[i, j] = int(digest, 16)
    arrays: dict[str, np.ndarray] = {layout.mean_path(layer): means[layer] for layer in meta.layers}
    arrays[layout.INDEX_NBYTES] = nbytes
    arrays[layout.INDEX_XXH3] = digests
    put_arrays(store, arrays)
    attrs = dict(doc.get("attributes") or {})
    attrs.update(stats=stats, complete=True)
    doc["attributes"] = attrs
    store.put("zarr.json", json.dumps(doc, indent=2).encode())
    return stats


def put_arrays(store: Store, arrays: dict[str, np.ndarray]) -> None:
    """Write whole small arrays (one chunk each, no compression) with their zarr metadata."""
    import zarr

    mem: dict[str, Any] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(mem), mode="w", zarr_format=3)
    for name, arr in arrays.items():
        z = group.create_array(name, shape=arr.shape, chunks=arr.shape, dtype=arr.dtype, compressors=None,
                               fill_value=0)
        z[...] = arr
    for key in sorted(mem):
        if key != "zarr.json":  # the root document is the caller's to write, last
            store.put(key, mem[key].to_bytes())
