"""Read-ahead of chunks on background threads, for caches that cannot be memory-mapped.

Why: from an object store one chunk is one request with a round-trip of latency, and a compressed
chunk needs decoding; fetched one at a time on the consumer's thread, training would wait on every
chunk. Readers of the cache almost always walk chunks in order (the token stream, held-out ranges,
statistics, top examples), so a reader asking for chunk i is very likely to ask for i+1, i+2, ...
next: those are started at once on a thread pool (``depth`` chunks in flight, so memory is bounded
by depth decoded chunks). Fetch, checksum and decode all happen on the pool's threads; obstore's
I/O and zstd's decoder release the GIL, so they overlap with each other and with the consumer.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
POOL_THREADS = 8


def shared_pool() -> ThreadPoolExecutor:
    """One pool for every read-ahead of the process: the number of requests in flight stays bounded
    however many layers or caches are being read."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="cache-fetch")
        return _POOL


class ReadAhead:
    """Chunks of one layer by index; asking for chunk i starts chunks next(i), next(next(i)), ...

    ``load(i)`` returns the decoded, verified chunk; ``following(i)`` gives the chunk expected after
    i (or None at the end). ``waited`` is the time the consumer spent blocked on chunks not yet ready.
    """

    def __init__(self, load: Callable[[int], Any], following: Callable[[int], int | None],
                 depth: int = 6) -> None:
        self.load = load
        self.following = following
        self.depth = max(0, depth)
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.waited = 0.0
        self.fetched = 0

    def _start(self, index: int) -> Future:
        fut = self._futures.get(index)
        if fut is None:
            fut = shared_pool().submit(self.load, index)
            self._futures[index] = fut
        return fut

    def get(self, index: int) -> Any:
        with self._lock:
            fut = self._start(index)
            window = [index]
            nxt: int | None = index
            for _ in range(self.depth):
                nxt = self.following(nxt) if nxt is not None else None
                if nxt is None or nxt in window:
                    break
                window.append(nxt)
                self._start(nxt)
            for old in [i for i in self._futures if i not in window]:  # left behind: drop (bounded memory)
                self._futures.pop(old).cancel()
            self._futures.pop(index)
        if not fut.done():
            t0 = time.perf_counter()
            result = fut.result()
            self.waited += time.perf_counter() - t0
        else:
            result = fut.result()
        self.fetched += 1
        return result

    def prefetch(self, indices: list[int]) -> None:
        """Start these chunks (e.g. every chunk a gather will touch), up to the depth bound."""
        with self._lock:
            for i in indices[: max(1, self.depth)]:
                self._start(i)

    def close(self) -> None:
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
