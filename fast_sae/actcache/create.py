"""Creating a cache: token stream, tokenizer and array metadata, before any activation.

Why it is written whole and then made visible in one step: every later writer (a resumed harvest,
a second worker, a worker joining late) and every reader may rely on a cache that exists having its
complete token stream. On a local disk it is built in ``CACHE.creating-<pid>/`` and renamed into
place. On an object store, where nothing renames, it is built in a local temporary folder and
uploaded with the root ``zarr.json`` last: that object is the commit point, and a prefix without it
is not a cache. Both give the same bytes.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr
from zarr.codecs import ZstdCodec

from . import layout
from .integrity import zarr_codecs
from .layout import CacheError, CacheMeta
from .locking import sweep_creating
from .store import LocalStore, Store

# Names a partly uploaded cache may hold: a prefix holding anything else is not ours to write into.
_OURS = ("tokens/", "sequences/", "acts/", "stats/", "tokenizer/", "index/", "commits/", "zarr.json")


def token_stream_hash(ids: np.ndarray, positions: np.ndarray, roles: np.ndarray, doc_ids: np.ndarray,
                      seq_starts: np.ndarray) -> str:
    """Hash of everything the token stream stores: a resume or another worker must see the same one."""
    h = xxhash.xxh3_128()
    for arr, dt in ((ids, "<i4"), (positions, "<i4"), (roles, "u1"), (doc_ids, "<i4"), (seq_starts, "<i8")):
        a = np.ascontiguousarray(arr, dtype=dt)
        h.update(np.array([len(a)], "<i8").tobytes())
        h.update(a.data.cast("B"))
    return "xxh3_128:" + h.hexdigest()


def _build(folder: Path, meta: CacheMeta, tokens: Any, tokenizer: Any | None) -> None:
    """Write the whole initial cache into ``folder`` (a local directory)."""
    group = zarr.open_group(zarr.storage.LocalStore(folder), mode="w", zarr_format=3)
    n, chunk, d = meta.n_tokens, meta.chunk_tokens, meta.d_model
    small = ZstdCodec(level=3, checksum=True)
    for name, arr in ((layout.TOKEN_IDS, tokens.ids.astype(np.int32)),
                      (layout.POSITIONS, tokens.positions.astype(np.int32)),
                      (layout.ROLES, tokens.roles.astype(np.uint8)),
                      (layout.DOC_IDS, tokens.doc_ids.astype(np.int32)),
                      (layout.SEQ_STARTS, tokens.seq_starts.astype(np.int64))):
        z = group.create_array(name, shape=arr.shape, chunks=(max(1, min(len(arr), 1 << 20)),), dtype=arr.dtype,
                               compressors=small, fill_value=0)
        z[:] = arr
    n_chunks = -(-n // chunk)
    for layer in meta.layers:
        group.create_array(layout.acts_path(layer), shape=(n, d), chunks=(chunk, d), dtype=meta.dtype,
                           compressors=zarr_codecs(meta.compression), fill_value=0)
        group.create_array(layout.chunk_sum_path(layer), shape=(n_chunks, d), chunks=(1, d), dtype=np.float64,
                           compressors=None, fill_value=0)
        group.create_array(layout.norm_path(layer), shape=(n,), chunks=(chunk,), dtype=np.float32,
                           compressors=None, fill_value=0)
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(str(folder / layout.TOKENIZER_DIR))
        except OSError:
            raise
        except Exception as exc:  # the Rust tokenizers library raises a plain Exception for I/O errors
            code = re.search(r"os error ([0-9]+)", str(exc))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(exc).splitlines()[0] if str(exc) else
                          type(exc).__name__, str(folder / layout.TOKENIZER_DIR)) from None
    attrs = meta.to_attrs()
    attrs.update(complete=False, stats=None)
    group.attrs.update(attrs)


def _space_error(where: object, exc: OSError) -> CacheError:
    what = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    name = f" (writing {exc.filename})" if exc.filename else ""
    return CacheError(f"{where}: cannot create the cache: {what}{name}; nothing was kept")


def create_cache(store: Store, meta: CacheMeta, tokens: Any, tokenizer: Any | None) -> bool:
    """Create the cache at ``store``; False if another writer created it first (then it is used)."""
    if isinstance(store, LocalStore):
        return _create_local(store.root, meta, tokens, tokenizer)
    return _create_remote(store, meta, tokens, tokenizer)


def _create_local(path: Path, meta: CacheMeta, tokens: Any, tokenizer: Any | None) -> bool:
    sweep_creating(path)
    if path.exists():
        path.rmdir()  # an empty folder (callers checked); anything else is never removed
    tmp = path.with_name(path.name + f".creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _build(tmp, meta, tokens, tokenizer)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _space_error(path, exc) from None
    try:
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False  # another harvest created it a moment ago: join it
        raise CacheError(f"{path}: cannot move the new cache into place ({exc.strerror})") from None
    return True


def _create_remote(store: Store, meta: CacheMeta, tokens: Any, tokenizer: Any | None) -> bool:
    existing = store.list()
    foreign = sorted(k for k in existing if not k.startswith(_OURS))
    if foreign:
        raise CacheError(f"{store.location}: not empty and not an activation cache (holds {foreign[0]!r}); "
                         f"use another location")
    with tempfile.TemporaryDirectory(prefix="fast-sae-create-") as tmp_dir:
        folder = Path(tmp_dir) / "cache"
        try:
            _build(folder, meta, tokens, tokenizer)
        except OSError as exc:
            raise _space_error(store.location, exc) from None
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        root = folder / "zarr.json"
        for f in files:
            if f != root:
                store.put(f.relative_to(folder).as_posix(), f.read_bytes())
        store.put("zarr.json", root.read_bytes())  # the commit point
    return True
