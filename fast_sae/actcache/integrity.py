"""Chunk bytes: encoding, decoding and the per-file checksum.

Why xxh3-64: a bit flip in a chunk is otherwise read as plausible activations (training quietly
learns garbage). The checksum is taken over the stored bytes of each file at commit and checked on
read; xxh3 hashes at ~10 GB/s on one core here, 2-3x a memcpy, where crc32c (google-crc32c) does
~6 GB/s and zlib's crc32 ~1 GB/s (bench/cache_integrity.py measures it). It is recorded, not
embedded (a zarr crc32c codec would add 4 bytes to each file and end the plain-array layout).
Compressed chunks additionally carry zstd's own content checksum, which the decoder checks.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from .layout import CacheError

ZSTD_LEVEL = 3


def as_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return np.ascontiguousarray(arr).data.cast("B")


def checksum(data: Any) -> str:
    """xxh3-64 of the bytes, as 16 hex digits (JSON-safe, exact)."""
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


def checksum_int(data: Any) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


def zarr_codecs(compression: str) -> Any:
    """The zarr v3 ``compressors`` of an activation array."""
    from zarr.codecs import ZstdCodec

    if compression == "none":
        return None
    if compression == "zstd":
        return ZstdCodec(level=ZSTD_LEVEL, checksum=True)
    raise CacheError(f"compression {compression!r}: expected 'none' or 'zstd'")


def encode_chunk(rows: np.ndarray, chunk_tokens: int, dtype: str, compression: str) -> bytes | memoryview:
    """The stored bytes of one chunk: a full (chunk_tokens, d) little-endian C-order array (edge chunks
    zero-padded, as zarr pads them), optionally zstd-compressed with the content checksum on. Zarr
    reads these bytes back through the array's codecs."""
    d = rows.shape[1]
    full = np.zeros((chunk_tokens, d), dtype=np.dtype(dtype).newbyteorder("<"))
    full[:len(rows)] = rows
    raw = as_bytes(full)
    if compression == "none":
        return raw
    from numcodecs import Zstd

    return bytes(Zstd(level=ZSTD_LEVEL, checksum=True).encode(raw))


def decode_chunk(data: bytes | memoryview, rows: int, d: int, dtype: str, compression: str,
                 where: str) -> np.ndarray:
    """The first ``rows`` rows of a stored chunk, read-only, without a copy when uncompressed."""
    dt = np.dtype(dtype).newbyteorder("<")
    if compression == "zstd":
        from numcodecs import Zstd

        try:
            data = Zstd().decode(data)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged frames
            raise CacheError(f"{where}: cannot decode chunk ({str(exc).splitlines()[0] if str(exc) else 'zstd'})"
                             ) from None
    arr = np.frombuffer(data, dtype=dt)
    if arr.size < rows * d:
        raise CacheError(f"{where}: chunk holds {arr.size} values, expected at least {rows * d}")
    return arr[:rows * d].reshape(rows, d)


def check_finite(rows: np.ndarray, where: str, first_token: int | np.ndarray) -> None:
    """NaN/inf activations mean a corrupt chunk or a broken harvest: stop with the place.

    ``first_token`` is the first row's token index (contiguous rows) or every row's token index.
    A sum is non-finite iff some element is (or, rarely, it overflows): one cheap reduction, and the
    exact element test only when it fires. The row sums are a matrix-vector product with ones
    (BLAS: ~3x numpy's pairwise sum here, so the check costs a fraction of the copy it guards)."""
    if rows.size == 0:
        return
    if rows.dtype == np.float32 and rows.ndim == 2:
        total = np.add.reduce(rows @ np.ones(rows.shape[1], dtype=np.float32), dtype=np.float64)
    else:
        total = np.add.reduce(rows, axis=None, dtype=np.float32)
    if np.isfinite(total):
        return
    bad_rows = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad_rows) == 0:
        return  # the sum overflowed; every value is finite
    row = int(bad_rows[0])
    tok = int(first_token[row]) if isinstance(first_token, np.ndarray) else first_token + row
    raise CacheError(f"{where}: non-finite activations (token {tok}); the cache is corrupt")
