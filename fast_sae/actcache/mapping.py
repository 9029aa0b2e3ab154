"""A local chunk file as a read-only array over a memory map.

Why its own mmap rather than ``np.memmap``: MAP_POPULATE maps every page of the file at once
instead of faulting them in one by one on first touch, and the one map can be shared by the thread
that verifies the chunk's checksum and the loader that reads it.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .layout import CacheError


def map_chunk_file(path: Path, nbytes: int, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """The chunk file at ``path`` (which must hold exactly ``nbytes``) as a read-only array of ``shape``."""
    size = path.stat().st_size if path.is_file() else -1
    if size != nbytes:
        what = "missing" if size < 0 else f"{size} bytes, expected {nbytes}"
        raise CacheError(f"{path}: chunk file {what}; the cache is truncated or corrupt")
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ)
    return np.frombuffer(mm, dtype=dtype).reshape(shape)
