"""Resumable writer of the activation cache.

Why it looks like this: a harvest may be killed at any point (pre-empted GPU, Ctrl-C, OOM), and a
rerun with the same arguments must produce a byte-identical cache. So
- the token stream (ids, positions, roles, sequence starts) is written in full *before* any
  activation, inside a temporary folder that is renamed into place: a cache folder either does not
  exist or has its complete token stream and metadata;
- activations are written in whole chunks only; each chunk file is written atomically by zarr's
  LocalStore, and the watermark ``tokens_committed`` (a multiple of the chunk size) is advanced in
  the group attributes (also an atomic file replace) only after every layer's chunk is on disk;
- on resume, tokens below the watermark are skipped, everything above is recomputed.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from . import layout
from .layout import CacheError, CacheMeta


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


# zarr skips writing chunks equal to the fill value; a cache must hold every chunk file, so a missing
# one always means damage (and chunk files stay memory-mappable).
_EVERY_CHUNK = {"array.write_empty_chunks": True}


def _compressors(compression: str) -> Any:
    if compression == "none":
        return None
    if compression == "zstd":
        return ZstdCodec(level=3)
    raise CacheError(f"compression {compression!r}: expected 'none' or 'zstd'")


def _diff_args(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key} (cache: {old.get(key)!r}, now: {new.get(key)!r})"
    return None


class CacheWriter:
    """Writes activations of a known token stream into a cache, chunk by chunk, resumably."""

    def __init__(self, path: Path, group: zarr.Group, meta: CacheMeta, committed: int) -> None:
        self.path = path
        self.group = group
        self.meta = meta
        self.committed = committed  # tokens durably on disk (chunk-aligned, or n_tokens when complete)
        with zarr.config.set(_EVERY_CHUNK):  # resolved when the array objects are made
            self._arrays = {layer: group[layout.acts_path(layer)] for layer in meta.layers}
        self._pending: dict[int, list[np.ndarray]] = {layer: [] for layer in meta.layers}
        self._pending_start = committed
        self._pending_len = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_resume(cls, path: str | Path, meta: CacheMeta, tokens: TokenArrays,
                         tokenizer: Any | None = None) -> CacheWriter:
        """Open ``path`` for writing: create it, or resume it if it was made with the same arguments."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            return cls._resume(path, meta)
        if path.exists():
            path.rmdir()
        tmp = path.with_name(path.name + f".creating-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        with zarr.config.set(_EVERY_CHUNK):
            cls._create(tmp, meta, tokens, tokenizer)
        os.replace(tmp, path)
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+", zarr_format=3)
        return cls(path, group, meta, 0)

    @staticmethod
    def _create(tmp: Path, meta: CacheMeta, tokens: TokenArrays, tokenizer: Any | None) -> None:
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        n = meta.n_tokens
        chunk = meta.chunk_tokens
        for name, arr in ((layout.TOKEN_IDS, tokens.ids.astype(np.int32)),
                          (layout.POSITIONS, tokens.positions.astype(np.int32)),
                          (layout.ROLES, tokens.roles.astype(np.uint8)),
                          (layout.DOC_IDS, tokens.doc_ids.astype(np.int32))):
            z = group.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 20)),), dtype=arr.dtype,
                                   compressors=ZstdCodec(level=3), fill_value=0)
            z[:] = arr
        starts = tokens.seq_starts.astype(np.int64)
        z = group.create_array(layout.SEQ_STARTS, shape=starts.shape, chunks=(max(1, min(len(starts), 1 << 20)),),
                               dtype=np.int64, compressors=ZstdCodec(level=3), fill_value=0)
        z[:] = starts
        for layer in meta.layers:
            group.create_array(layout.acts_path(layer), shape=(n, meta.d_model), chunks=(chunk, meta.d_model),
                               dtype=meta.dtype, compressors=_compressors(meta.compression), fill_value=0)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / layout.TOKENIZER_DIR))
        attrs = meta.to_attrs()
        attrs.update(tokens_committed=0, complete=False, stats=None)
        group.attrs.update(attrs)

    @classmethod
    def _resume(cls, path: Path, meta: CacheMeta) -> CacheWriter:
        from .reader import ActivationCache  # the reader validates what is on disk

        cache = ActivationCache.open(path, require_complete=False)
        diff = _diff_args(cache.meta.harvest_args, meta.harvest_args)
        if diff is not None:
            raise CacheError(f"{path}: cache was made with different arguments: {diff}; "
                             f"use another --out or delete it")
        if cache.meta.n_tokens != meta.n_tokens:
            raise CacheError(f"{path}: cache holds {cache.meta.n_tokens} tokens but the same arguments now give "
                             f"{meta.n_tokens}: the dataset changed; use another --out")
        cache.verify_chunks()
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+", zarr_format=3)
        return cls(path, group, cache.meta, cache.tokens_committed)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete"))

    # ------------------------------------------------------------------ writing
    def write(self, start: int, acts: dict[int, np.ndarray]) -> None:
        """Add the activations of tokens [start, start + len) ; blocks must arrive in order.

        Tokens below the watermark (already on disk from an earlier run) are dropped, so a resumed
        harvest can simply redo the batch that straddles the watermark.
        """
        self._raise_if_failed()
        length = len(next(iter(acts.values())))
        end = start + length
        expected = self._pending_start + self._pending_len
        if end <= expected:
            return
        if start > expected:
            raise CacheError(f"{self.path}: activations for token {start} arrive before token {expected}")
        skip = expected - start
        for layer in self.meta.layers:
            block = acts[layer]
            if block.shape != (length, self.meta.d_model):
                raise CacheError(f"{self.path}: layer {layer} block has shape {block.shape}, "
                                 f"expected ({length}, {self.meta.d_model})")
            self._pending[layer].append(np.ascontiguousarray(block[skip:], dtype=self.meta.dtype))
        self._pending_len += length - skip
        chunk = self.meta.chunk_tokens
        full = (self._pending_len // chunk) * chunk
        if full:
            self._flush(full)

    def _flush(self, count: int) -> None:
        start = self._pending_start
        out: dict[int, np.ndarray] = {}
        for layer in self.meta.layers:
            data = np.concatenate(self._pending[layer]) if len(self._pending[layer]) > 1 else self._pending[layer][0]
            out[layer] = data[:count]
            rest = data[count:]
            self._pending[layer] = [rest] if len(rest) else []
        self._pending_start += count
        self._pending_len -= count
        self._queue.put((start, out))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None or self._error is not None:
                    return
                start, out = item
                for layer, data in out.items():
                    self._arrays[layer][start:start + len(data)] = data
                self.committed = start + len(next(iter(out.values())))
                self.group.attrs["tokens_committed"] = self.committed
            except BaseException as exc:  # surfaced in the producer thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise CacheError(f"{self.path}: writing activations failed: {self._error}") from self._error

    def flush_wait(self) -> None:
        """Block until every queued chunk is durably on disk."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> dict[str, Any]:
        """Write the last partial chunk, compute per-layer statistics and mark the cache complete."""
        if self._pending_len:
            self._flush(self._pending_len)
        self.flush_wait()
        self.close()
        if self.committed != self.meta.n_tokens:
            raise CacheError(f"{self.path}: finished with {self.committed} of {self.meta.n_tokens} tokens written")
        from .reader import ActivationCache
        from .stats import compute_layer_stats

        cache = ActivationCache.open(self.path, require_complete=False)
        roles = cache.roles()
        stats: dict[str, Any] = {}
        for layer in self.meta.layers:
            mean, summary = compute_layer_stats(cache, layer, roles)
            z = self.group.create_array(layout.mean_path(layer), shape=mean.shape, chunks=mean.shape,
                                        dtype=np.float64, compressors=None, fill_value=0, overwrite=True)
            z[:] = mean
            stats[str(layer)] = summary
        self.group.attrs.update({"stats": stats, "complete": True, "tokens_committed": self.meta.n_tokens})
        return stats
