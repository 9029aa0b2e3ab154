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
                 where: str, chunk_tokens: int | None = None) -> np.ndarray:
    """The first ``rows`` rows of a stored chunk, read-only, without a copy when uncompressed.
    A compressed chunk decodes into a buffer of the chunk's size (``chunk_tokens`` rows): a frame that
    claims more is refused, never expanded."""
    dt = np.dtype(dtype).newbyteorder("<")
    if compression == "zstd":
        from numcodecs import Zstd

        size = (chunk_tokens or rows) * d * dt.itemsize
        content = zstd_content_size(data)
        if content != size:
            raise CacheError(f"{where}: compressed chunk declares {content} bytes, expected {size}; the chunk is "
                             f"corrupt")
        try:
            data = Zstd().decode(data, out=np.empty(size, dtype=np.uint8))
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged frames
            raise CacheError(f"{where}: cannot decode chunk ({str(exc).splitlines()[0] if str(exc) else 'zstd'})"
                             ) from None
    arr = np.frombuffer(data, dtype=dt)
    if arr.size < rows * d:
        raise CacheError(f"{where}: chunk holds {arr.size} values, expected at least {rows * d}")
    return arr[:rows * d].reshape(rows, d)


def zstd_content_size(data: bytes | memoryview) -> int | None:
    """The decompressed size a zstd frame's header declares (None: not a frame, or no size field).

    Read before decoding, so a frame that would expand beyond the chunk's size is refused rather than
    decoded (RFC 8878, 3.1.1.1: magic, descriptor, window byte, dictionary id, content size)."""
    head = bytes(memoryview(data)[:18])
    if len(head) < 5 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    desc = head[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    n = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if n == 0 or len(head) < pos + n:
        return None
    value = int.from_bytes(head[pos:pos + n], "little")
    return value + 256 if n == 2 else value


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
