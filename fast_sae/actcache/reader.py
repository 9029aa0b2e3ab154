"""Reading the activation cache: metadata, token stream, and activations by memory map or by fetch.

Why memory maps: training reads tens of GB sequentially many times; an uncompressed chunk file of a
local cache is a plain little-endian C-order array (zarr writes full-size edge chunks too), so a
chunk can be memory-mapped (mapping.py) and handed to torch without a copy or a decode. Remote and
compressed chunks are fetched whole (with read-ahead, prefetch.py), checked against the checksum
recorded at commit, and decoded. Every activation that leaves this module has been checked finite.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import layout
from .commits import committed_indices, read_records
from .integrity import check_finite, checksum, checksum_int, decode_chunk
from .layout import CacheError, CacheMeta
from .mapping import map_chunk_file
from .prefetch import ReadAhead
from .store import LocalStore, RemotePath, Store, open_store
from .trusted import VerifiedRecord
from .validate import validate_arrays, validate_seq_starts
from .writer import read_root


@dataclass
class LayerStats:
    """Per-layer statistics computed once at the end of the harvest (see actcache.commits)."""

    mean: np.ndarray  # (d_model,) float64, mean over all stored tokens
    mean_sq_norm: float  # E ||x||^2 over all tokens
    mean_sq_norm_content: float | None  # E ||x||^2 over content tokens only (no special/template/BOS)
    median_norm: float
    max_norm: float
    mean_sq_centered: float  # E ||x - mean||^2, the denominator of explained variance


class ActivationCache:
    """A harvested cache, opened read-only."""

    def __init__(self, store: Store, group: zarr.Group, meta: CacheMeta, attrs: dict[str, Any],
                 verify: bool = True) -> None:
        self.store = store
        self.path: Path | RemotePath = store.location
        self.group = group
        self.meta = meta
        self.attrs = attrs
        self.verify = verify  # check each chunk's checksum the first time it is read in this process
        self._verified: set[tuple[int, int]] = set()
        self._verify_lock = threading.Lock()
        self._readahead: dict[int, ReadAhead] = {}
        self._verify_ahead: dict[int, ReadAhead] = {}
        self._mapped: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # recent maps, shared

    @classmethod
    def open(cls, path: str | Path | RemotePath, require_complete: bool = True,
             options: dict[str, str] | None = None, verify: bool = True) -> ActivationCache:
        store = open_store(path, options)
        if isinstance(store, LocalStore):
            if not store.root.is_dir():
                raise CacheError(f"{store.root}: no such cache folder")
            store.list()  # refuses a symlink, device or FIFO anywhere in the cache (one walk; no file is read)
        doc = read_root(store)
        attrs = doc.get("attributes") or {}
        meta = CacheMeta.from_attrs(attrs, store.where("zarr.json"))
        try:
            group = zarr.open_group(store.zarr_store(read_only=True), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises many kinds here
            raise CacheError(f"{store.location}: cannot open as a zarr v3 group ({exc})") from None
        cache = cls(store, group, meta, attrs, verify=verify)
        validate_arrays(store, meta)
        validate_seq_starts(cache.seq_starts(), meta, store.where(layout.SEQ_STARTS))
        if require_complete and not cache.complete:
            raise CacheError(f"{store.location}: harvest not finished ({cache.progress_text()}); rerun the same "
                             f"harvest command (every worker) to resume it")
        return cache

    # ------------------------------------------------------------------ state
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def tokens_committed(self) -> int:
        """Tokens whose activations are stored (version 1: the watermark; 2: rows of done chunks)."""
        if self.meta.format_version == 1:
            return int(self.attrs.get("tokens_committed", 0))
        if self.complete:
            return self.meta.n_tokens
        return sum(self.chunk_rows(i) for i in committed_indices(self.store) if i < self.n_chunks)

    def progress_text(self) -> str:
        if self.meta.format_version == 1:
            return f"{self.tokens_committed} of {self.meta.n_tokens} tokens committed"
        done = len([i for i in committed_indices(self.store) if i < self.n_chunks])
        return f"{done} of {self.n_chunks} chunks committed"

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def n_chunks(self) -> int:
        return -(-self.meta.n_tokens // self.meta.chunk_tokens)

    @property
    def local(self) -> bool:
        return isinstance(self.store, LocalStore)

    @property
    def memmappable(self) -> bool:
        """Chunks can be mapped straight from local files (uncompressed local caches)."""
        return self.meta.compression == "none" and self.local

    # ------------------------------------------------------------------ token stream
    def _small(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.group[name][...])  # type: ignore[index]
        except CacheError:
            raise
        except Exception as exc:  # zarr/numcodecs raise many kinds on a damaged array
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CacheError(f"{self.store.where(name)}: cannot read the array ({msg}); the cache is corrupt"
                             ) from None

    @cached_property
    def _tokens(self) -> dict[str, np.ndarray]:
        out = {}
        for name in (layout.TOKEN_IDS, layout.POSITIONS, layout.ROLES, layout.DOC_IDS):
            arr = self._small(name)
            if arr.shape != (self.meta.n_tokens,):
                raise CacheError(f"{self.store.where(name)}: holds {arr.shape} entries, n_tokens is "
                                 f"{self.meta.n_tokens}")
            out[name] = arr
        return out

    def token_ids(self) -> np.ndarray:
        return self._tokens[layout.TOKEN_IDS]

    def positions(self) -> np.ndarray:
        return self._tokens[layout.POSITIONS]

    def roles(self) -> np.ndarray:
        return self._tokens[layout.ROLES]

    def doc_ids(self) -> np.ndarray:
        return self._tokens[layout.DOC_IDS]

    @cached_property
    def _seq_starts(self) -> np.ndarray:
        return self._small(layout.SEQ_STARTS)

    def seq_starts(self) -> np.ndarray:
        return self._seq_starts

    def sequence_of_token(self) -> np.ndarray:
        """Index of the sequence each token belongs to."""
        starts = self.seq_starts()
        return np.repeat(np.arange(len(starts) - 1), np.diff(starts))

    # ------------------------------------------------------------------ activations
    def _check_layer(self, layer: int) -> None:
        if layer not in self.meta.layers:
            raise CacheError(f"{self.path}: layer {layer} not in cache (layers: {self.meta.layers})")

    def chunk_key(self, layer: int, index: int) -> str:
        return layout.chunk_key(layout.acts_path(layer), index)

    def chunk_file(self, layer: int, index: int) -> Path | RemotePath:
        """Where chunk ``index`` of a layer is stored (a file, or an object under the cache URL)."""
        return self.path / self.chunk_key(layer, index)

    def chunk_bytes(self) -> int:
        return self.meta.chunk_tokens * self.meta.d_model * np.dtype(self.meta.dtype).itemsize

    def chunk_rows(self, index: int) -> int:
        start = index * self.meta.chunk_tokens
        return min(self.meta.chunk_tokens, self.meta.n_tokens - start)

    @cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(stored bytes, xxh3) of every activation chunk (n_chunks, n_layers); None for version 1."""
        if self.meta.format_version == 1:
            return None
        if self.complete:
            return self._small(layout.INDEX_NBYTES), self._small(layout.INDEX_XXH3)
        n, k = self.n_chunks, len(self.meta.layers)
        nbytes, digests = np.full((n, k), -1, np.int64), np.zeros((n, k), np.uint64)
        for i, rec in read_records(self.store, sorted(committed_indices(self.store))).items():
            for j, layer in enumerate(self.meta.layers):
                nb, dg = rec.files.get(self.chunk_key(layer, i), (-1, "0"))
                nbytes[i, j], digests[i, j] = nb, int(dg, 16)
        return nbytes, digests

    def expected(self, layer: int, index: int) -> tuple[int | None, int | None]:
        """(stored bytes, xxh3-64) recorded for a chunk; (size, None) when no checksum is recorded."""
        idx = self._index
        if idx is None:
            return (self.chunk_bytes() if self.meta.compression == "none" else None), None
        j = self.meta.layers.index(layer)
        nb = int(idx[0][index, j])
        if nb < 0:
            raise CacheError(f"{self.chunk_file(layer, index)}: chunk {index} is not committed yet")
        return nb, int(idx[1][index, j])

    def _verify_bytes(self, layer: int, index: int, data: Any) -> None:
        nbytes, digest = self.expected(layer, index)
        where = self.chunk_file(layer, index)
        if nbytes is not None and len(memoryview(data).cast("B")) != nbytes:
            raise CacheError(f"{where}: {len(memoryview(data).cast('B'))} bytes, expected {nbytes}; the cache is "
                             f"truncated or corrupt")
        if digest is not None and checksum_int(data) != digest:
            raise CacheError(f"{where}: checksum mismatch (recorded {digest:016x}, read {checksum(data)}); "
                             f"the chunk is corrupt")

    def _load(self, layer: int, index: int) -> np.ndarray:
        """Fetch (with retries), verify and decode one chunk: the read path of remote/compressed caches."""
        key = self.chunk_key(layer, index)
        nbytes, _ = self.expected(layer, index)
        data = self.store.get_checked(key, nbytes, lambda d: self._verify_bytes(layer, index, d))
        return decode_chunk(data, self.chunk_rows(index), self.meta.d_model, self.meta.dtype,
                            self.meta.compression, str(self.chunk_file(layer, index)), self.meta.chunk_tokens)

    @cached_property
    def verified_record(self) -> VerifiedRecord | None:
        """Chunk files verified by an earlier process and unchanged since (local caches; trusted.py)."""
        return VerifiedRecord(self.store.root) if isinstance(self.store, LocalStore) else None

    def record_verified(self, layer: int, index: int, before: os.stat_result) -> None:
        """Remember that a local chunk file, stat-ed as ``before`` before it was read, passed its checksum."""
        record, (_, digest) = self.verified_record, self.expected(layer, index)
        if record is not None and digest is not None:
            record.add(self.chunk_key(layer, index), before, Path(str(self.chunk_file(layer, index))), digest)

    def _verify_file(self, layer: int, index: int) -> None:
        """Checksum of one local chunk file, hashed straight from its memory map (on a read-ahead
        thread: xxhash releases the GIL). Hashing the map the loader will read, rather than a copy,
        costs no extra pass over the bytes and leaves the pages mapped for the loader. A file an
        earlier process verified, unchanged since (its identity as recorded), is not hashed again."""
        if (layer, index) in self._verified:
            return
        try:
            before: os.stat_result | None = os.stat(str(self.chunk_file(layer, index)))
        except OSError:
            before = None  # the map below reports the missing file
        nbytes, digest = self.expected(layer, index)
        record = self.verified_record
        if before is not None and record is not None and before.st_size == nbytes and \
                record.trusted(self.chunk_key(layer, index), before, digest):
            with self._verify_lock:
                self._verified.add((layer, index))
            return
        self._verify_bytes(layer, index, self._map_file(layer, index))
        if before is not None:
            self.record_verified(layer, index, before)
        with self._verify_lock:
            self._verified.add((layer, index))

    def _map_file(self, layer: int, index: int) -> np.ndarray:
        """The whole chunk file as a read-only array over one shared memory map (the last few are
        kept, so the verifying thread and the loader use the same map). MAP_POPULATE maps every
        page at once instead of faulting them in one by one on first touch."""
        key = (layer, index)
        with self._verify_lock:
            arr = self._mapped.get(key)
            if arr is not None:
                self._mapped.move_to_end(key)
                return arr
        assert isinstance(self.store, LocalStore)  # memmappable caches only
        arr = map_chunk_file(self.store, self.chunk_key(layer, index), self.chunk_bytes(),
                             np.dtype(self.meta.dtype).newbyteorder("<"), (self.meta.chunk_tokens, self.meta.d_model))
        with self._verify_lock:
            self._mapped[key] = arr
            while len(self._mapped) > 16:
                self._mapped.popitem(last=False)
        return arr

    def memmap_chunk(self, layer: int, index: int, wrap_at: int | None = None) -> np.ndarray:
        """Rows of one chunk as a read-only memory map (uncompressed local caches only). With
        verification on, the chunk's checksum is checked before it is returned, the first time; the
        following chunks are checked ahead on background threads, so the stream rarely waits."""
        self._check_layer(layer)
        if not self.memmappable:
            raise CacheError(f"{self.path}: a {'compressed' if self.local else 'remote'} cache cannot be "
                             f"memory-mapped")
        if self.verify and (layer, index) not in self._verified:
            ahead = self._verify_ahead.get(layer)
            if ahead is None:
                ahead = ReadAhead(lambda i: self._verify_file(layer, i), self._following(wrap_at), depth=4)
                self._verify_ahead[layer] = ahead
            ahead.get(index)
        return self._map_file(layer, index)[: self.chunk_rows(index)]

    def _following(self, wrap_at: int | None) -> Any:
        """The chunk read after chunk i: i + 1, and after the chunk holding token ``wrap_at - 1`` chunk 0
        (an endless stream over tokens [0, wrap_at)); None after the last chunk."""
        stop = self.n_chunks if wrap_at is None else -(-wrap_at // self.meta.chunk_tokens)

        def following(i: int) -> int | None:
            if wrap_at is not None and i + 1 == stop:
                return 0  # the training stream starts its next epoch
            return i + 1 if i + 1 < self.n_chunks else None
        return following

    def readahead(self, layer: int, wrap_at: int | None = None, depth: int = 6) -> ReadAhead:
        """The read-ahead of a layer's chunks (next chunk = index + 1; after the chunk holding token
        ``wrap_at - 1``, chunk 0, matching an endless stream over tokens [0, wrap_at))."""
        ra = self._readahead.get(layer)
        if ra is None:
            ra = ReadAhead(lambda i: self._load(layer, i), self._following(wrap_at), depth)
            self._readahead[layer] = ra
        return ra

    def chunk(self, layer: int, index: int, wrap_at: int | None = None) -> np.ndarray:
        """Rows of one chunk, read-only: a memory map when possible, else fetched with read-ahead
        (``wrap_at``: the reader walks an endless stream over tokens [0, wrap_at))."""
        self._check_layer(layer)
        if not 0 <= index < self.n_chunks:
            raise CacheError(f"{self.path}: chunk {index} outside [0, {self.n_chunks})")
        if self.memmappable:
            return self.memmap_chunk(layer, index, wrap_at)
        return self.readahead(layer, wrap_at).get(index)

    def read(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Activations of tokens [start, stop) of a layer, in the stored dtype, checked finite."""
        self._check_layer(layer)
        if not (0 <= start <= stop <= self.meta.n_tokens):
            raise CacheError(f"{self.path}: token range [{start}, {stop}) outside [0, {self.meta.n_tokens})")
        chunk = self.meta.chunk_tokens
        parts = []
        pos = start
        while pos < stop:
            index = pos // chunk
            lo = pos - index * chunk
            hi = min(stop - index * chunk, self.chunk_rows(index))
            parts.append(self.chunk(layer, index)[lo:hi])
            pos = index * chunk + hi
        if not parts:
            return np.zeros((0, self.meta.d_model), dtype=self.meta.dtype)
        out = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        check_finite(out, f"{self.path}: layer {layer}", start)
        return out

    def iter_chunks(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start token, activations) for every chunk of a layer, in order, checked finite."""
        self._check_layer(layer)
        for index in range(self.n_chunks):
            rows = self.chunk(layer, index)
            start = index * self.meta.chunk_tokens
            check_finite(rows, str(self.chunk_file(layer, index)), start)
            yield start, rows

    def verify_all(self, progress: Any = None) -> int:
        """Check every file (size, checksum, decoding, finiteness); for ``pipeline.py info --verify``."""
        from .audit import verify_all

        return verify_all(self, progress)

    def close(self) -> None:
        for ra in (*self._readahead.values(), *self._verify_ahead.values()):
            ra.close()
        self._readahead.clear()
        self._verify_ahead.clear()
        with self._verify_lock:
            self._mapped.clear()  # a map stays open while an array still uses it

    # ------------------------------------------------------------------ statistics and tokenizer
    def layer_stats(self, layer: int) -> LayerStats:
        self._check_layer(layer)
        stats = (self.attrs.get("stats") or {}).get(str(layer))
        if stats is None:
            raise CacheError(f"{self.path}: no statistics for layer {layer} (harvest not finished?)")
        mean = np.asarray(self._small(layout.mean_path(layer)), dtype=np.float64)
        if mean.shape != (self.meta.d_model,) or not np.isfinite(mean).all():
            raise CacheError(f"{self.store.where(layout.mean_path(layer))}: expected {self.meta.d_model} finite "
                             f"values; the statistics are corrupt")
        try:
            out = LayerStats(mean=mean, mean_sq_norm=float(stats["mean_sq_norm"]),
                             mean_sq_norm_content=None if stats.get("mean_sq_norm_content") is None
                             else float(stats["mean_sq_norm_content"]),
                             median_norm=float(stats["median_norm"]), max_norm=float(stats["max_norm"]),
                             mean_sq_centered=float(stats["mean_sq_centered"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{self.store.where('zarr.json')}: stats of layer {layer} are malformed ({exc})") from None
        return out

    def tokenizer(self) -> Any:
        """The model's tokenizer saved inside the cache, so tokens render as text without the model."""
        from transformers import AutoTokenizer

        if isinstance(self.store, LocalStore):
            folder = self.store.root / layout.TOKENIZER_DIR
            if not folder.is_dir():
                raise CacheError(f"{folder}: no tokenizer stored in the cache")
            return AutoTokenizer.from_pretrained(str(folder))
        files = self.store.list(layout.TOKENIZER_DIR)
        if not files:
            raise CacheError(f"{self.store.where(layout.TOKENIZER_DIR)}: no tokenizer stored in the cache")
        with tempfile.TemporaryDirectory(prefix="fast-sae-tokenizer-") as tmp:
            for key in files:
                target = Path(tmp) / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(bytes(self.store.get_checked(key)))
            return AutoTokenizer.from_pretrained(str(Path(tmp) / layout.TOKENIZER_DIR))

    def summary(self) -> dict[str, Any]:
        from .audit import summary

        return summary(self)
