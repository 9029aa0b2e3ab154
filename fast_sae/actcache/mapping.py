"""A local chunk file as a read-only array over a memory map.

Why its own mmap rather than ``np.memmap``: MAP_POPULATE maps every page of the file at once
instead of faulting them in one by one on first touch, and the one map can be shared by the thread
that verifies the chunk's checksum and the loader that reads it. The file is opened through
``LocalStore.open_file`` (a regular file inside the cache, never a symlink, device or FIFO), and
exactly the recorded number of bytes is mapped.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

import numpy as np

from .layout import CacheError
from .store import KeyMissing

if TYPE_CHECKING:
    from .store import LocalStore


def map_chunk_file(store: LocalStore, key: str, nbytes: int, dtype: np.dtype,
                   shape: tuple[int, int]) -> np.ndarray:
    """The chunk file ``key`` of a local cache (which must hold exactly ``nbytes``) as a read-only
    array of ``shape``."""
    path = store.root / key
    try:
        fd, size = store.open_file(key)
    except KeyMissing:
        raise CacheError(f"{path}: chunk file missing; the cache is truncated or corrupt") from None
    try:
        if size != nbytes:
            raise CacheError(f"{path}: chunk file {size} bytes, expected {nbytes}; the cache is truncated or corrupt")
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=dtype).reshape(shape)
