"""Reading activations out of the cache: contiguous ranges by memory map, row gathers, prefetch.

Why memory maps: an uncompressed chunk file of a local cache is a plain C-order array, so a
contiguous range of tokens is one ``memcpy`` from the page cache, with no decode and no zarr
overhead; the reads are sequential, which is what disks and the kernel's read-ahead like. Remote
and compressed caches are read through the cache's read-ahead (several chunks fetched, verified and
decoded on background threads ahead of the stream, wrapping at the end of the training tokens like
the stream does). Every chunk's checksum is checked on its first read in the process, and every
row leaving here is checked finite. All reads return float32 and are scaled by the run's
normalisation factor here, once, so the trainer never sees raw activations.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.integrity import check_finite as _check_finite


@dataclass(frozen=True)
class DataSplit:
    """Which tokens train and which are held out for evaluation.

    The held-out set is the last ``eval_sequences`` whole sequences of the cache: a contiguous
    token range, so evaluation can read it sequentially and no held-out token is ever trained on.
    """

    n_tokens: int
    n_sequences: int
    train_tokens: int  # tokens [0, train_tokens) are the training stream
    eval_first_sequence: int  # sequences [eval_first_sequence, n_sequences) are held out

    @classmethod
    def from_cache(cls, cache: ActivationCache, eval_sequences: int) -> DataSplit:
        starts = cache.seq_starts()
        n_seq = len(starts) - 1
        if eval_sequences >= n_seq:
            raise CacheError(f"{cache.path}: cannot hold out {eval_sequences} sequences for evaluation; "
                             f"the cache has only {n_seq}")
        first = n_seq - eval_sequences
        return cls(n_tokens=int(starts[-1]), n_sequences=n_seq, train_tokens=int(starts[first]),
                   eval_first_sequence=first)

    @property
    def eval_range(self) -> tuple[int, int]:
        return self.train_tokens, self.n_tokens

    def to_json(self) -> dict[str, Any]:
        return {"train_token_range": [0, self.train_tokens], "eval_token_range": list(self.eval_range),
                "eval_sequence_range": [self.eval_first_sequence, self.n_sequences]}


class LayerReader:
    """Float32, normalised rows of one layer of the cache."""

    def __init__(self, cache: ActivationCache, layer: int, scale: float) -> None:
        if layer not in cache.meta.layers:
            raise CacheError(f"{cache.path}: layer {layer} not in cache (layers: {cache.meta.layers})")
        self.cache = cache
        self.layer = layer
        self.scale = np.float32(scale)
        self.chunk = cache.meta.chunk_tokens
        self.wrap_at: int | None = None  # set by TokenStream: the stream wraps to token 0 here
        self._maps: dict[int, np.ndarray] = {}

    def _chunk(self, index: int) -> np.ndarray:
        mm = self._maps.get(index)
        if mm is None:
            mm = self.cache.chunk(self.layer, index, wrap_at=self.wrap_at)
            # Bound what is kept: maps cost no memory, but fetched chunks are whole arrays.
            if len(self._maps) >= (64 if self.cache.memmappable else 2):
                self._maps.clear()
            self._maps[index] = mm
        return mm

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` (float32 [n, d]) with tokens [start, start + n), chunk by chunk."""
        pos, done, stop = start, 0, start + len(out)
        while pos < stop:
            index = pos // self.chunk
            lo = pos - index * self.chunk
            src = self._chunk(index)
            hi = min(stop - index * self.chunk, len(src))
            if hi <= lo:
                raise CacheError(f"{self.cache.path}: token {pos} beyond the data of layer {self.layer}")
            n = hi - lo
            if self.scale != 1:  # scale while copying: one pass over the bytes, as fast as a memcpy
                np.multiply(src[lo:hi], self.scale, out=out[done:done + n])
            else:
                out[done:done + n] = src[lo:hi]
            done += n
            pos += n
        check_finite(out, self, start)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.cache.meta.d_model), dtype=np.float32)
        self.read_into(out, start)
        return out

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows at arbitrary token indices, in the given order (reads each needed chunk once)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.cache.meta.d_model), dtype=np.float32)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        chunk_of = sorted_idx // self.chunk
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        if not self.cache.memmappable:  # start fetching every chunk the gather touches
            self.cache.readahead(self.layer, wrap_at=self.wrap_at).prefetch(np.unique(chunk_of).tolist())
        for part, rows in zip(np.split(sorted_idx, bounds), np.split(order, bounds)):
            if len(part) == 0:
                continue
            index = int(part[0] // self.chunk)
            out[rows] = self._chunk(index)[part - index * self.chunk]
        if self.scale != 1:
            out *= self.scale
        check_finite(out, self, indices)
        return out


def check_finite(rows: np.ndarray, reader: LayerReader, tokens: int | np.ndarray) -> None:
    """NaN/inf activations mean a corrupt chunk (or a broken harvest): stop with the place, not a NaN loss.

    ``tokens`` is the first row's token index (contiguous rows) or every row's token index."""
    first = int(tokens[0]) if isinstance(tokens, np.ndarray) and len(tokens) else tokens
    where = (f"{reader.cache.path}: layer {reader.layer} (chunk file "
             f"{reader.cache.chunk_file(reader.layer, int(first) // reader.chunk)})")
    _check_finite(rows, where, tokens)


def readers_for(cache: ActivationCache, layers: list[int], scales: dict[int, float]) -> dict[int, LayerReader]:
    return {layer: LayerReader(cache, layer, scales[layer]) for layer in layers}


class TokenStream:
    """The training tokens as an endless stream: stream position p is token p mod n_train.

    Why endless: a run may ask for more tokens than the cache holds; it then starts a new epoch in
    the same order (FAST reads instances sequentially; the mixing buffer does the shuffling).
    """

    def __init__(self, readers: dict[int, LayerReader], n_train: int) -> None:
        if n_train <= 0:
            raise CacheError("no training tokens left after holding out the evaluation sequences")
        self.readers = readers
        self.n_train = n_train
        for reader in readers.values():
            reader.wrap_at = n_train

    def read(self, position: int, count: int) -> dict[int, np.ndarray]:
        out = {}
        for layer, reader in self.readers.items():
            buf = np.empty((count, reader.cache.meta.d_model), dtype=np.float32)
            done = 0
            while done < count:
                tok = (position + done) % self.n_train
                n = min(count - done, self.n_train - tok)
                reader.read_into(buf[done:done + n], tok)
                done += n
            out[layer] = buf
        return out

    def indices(self, position: int, count: int) -> np.ndarray:
        return (np.arange(position, position + count, dtype=np.int64)) % self.n_train


_END = object()


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead of the consumer.

    Why a thread and not a process: the work is memcpy out of the page cache and numpy/torch
    kernels, which release the GIL, and a thread shares the produced arrays without pickling.
    Errors in the producer are re-raised in the consumer.
    """

    def __init__(self, make_iter: Callable[[], Iterator[Any]], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.waited = 0.0  # seconds the consumer was blocked waiting for data
        self._started = time.perf_counter()
        self._noted = (self._started, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_iter,), name="train-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make_iter: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make_iter():
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_END)
        except BaseException as exc:  # handed to the consumer
            self._queue.put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.waited += time.perf_counter() - t0
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def wait_note(self, threshold: float = 0.1) -> str | None:
        """A line when, since the last call, the consumer spent more than ``threshold`` of the time
        waiting for data (the reader, not the SAEs, is the bottleneck); else None."""
        now = time.perf_counter()
        t_last, w_last = self._noted
        self._noted = (now, self.waited)
        span, waited = now - t_last, self.waited - w_last
        if span <= 0 or waited <= threshold * span:
            return None
        return (f"waiting on data: {waited:.1f} s of the last {span:.1f} s ({100 * waited / span:.0f}%); the cache "
                f"is read slower than the SAEs train")

    def total_note(self) -> str:
        span = max(time.perf_counter() - self._started, 1e-9)
        return f"data wait: {self.waited:.1f} s of {span:.1f} s ({100 * self.waited / span:.0f}%)"

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
