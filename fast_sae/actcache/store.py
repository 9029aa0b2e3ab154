"""Where a cache lives: a local folder or any object store, behind one small key/bytes interface.

Why our own thin layer instead of handing zarr a URL everywhere: the cache needs a few things zarr's
array API does not give — atomic local writes whose leftovers we can find and sweep, sizes of many
objects from one listing, retries that also catch a short body, and errors that are one line naming
the object. Zarr is still the format: metadata and the token arrays are read through zarr on the
same store (``zarr_store``), and every chunk key we write is the zarr v3 key of that chunk.

Object stores are served by obstore (the Rust ``object_store`` crate of Apache Arrow): one
dependency-free wheel for s3://, gs://, az://, http(s)://, memory://; its network I/O runs off the
GIL, which is what lets a prefetching reader keep several chunks in flight from Python threads.
Any other scheme goes to zarr's fsspec store when fsspec and the scheme's implementation are
installed. Credentials and endpoints come from the usual environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_*, AZURE_*) or ``--storage-option``;
they are handed to the store client only, never written into a cache, a run folder or a log line.
"""
from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fast_sae.redact import redact_text

from .layout import CacheError
from .location import _DEFAULT_OPTIONS as _DEFAULTS
from .location import (
    OBSTORE_SCHEMES,
    RemotePath,
    StorageConfig,
    is_remote,
    parse_location,
    parse_storage_options,
    set_default_storage_options,
)

T = TypeVar("T")

TMP_DIR = ".tmp"  # local caches: temporary files, renamed into place (never part of the content)
LOCK_FILE = ".lock"  # local caches: the advisory lock file (never part of the content)
RETRIES = 4

__all__ = ["KeyMissing", "LocalStore", "RemotePath", "StorageConfig", "Store", "is_remote", "open_store",
           "parse_location", "parse_storage_options", "set_default_storage_options"]


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (a store library's may repeat the endpoint URL with its
    credentials: those are hidden)."""
    text = redact_text(str(exc)).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


class KeyMissing(CacheError):
    """The object does not exist."""


class Store:
    """Bytes by key under one cache location. Keys use '/' and are relative to the cache root."""

    location: Path | RemotePath

    def get(self, key: str, limit: int | None = None) -> bytes | memoryview:
        """The object's bytes. ``limit``: the caller needs at most this many (a local store reads no
        more than limit + 1, so a file of the wrong size is told without reading all of it)."""
        raise NotImplementedError

    def put(self, key: str, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the key does not exist."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` (content only: no temporary or lock files) with its size."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def zarr_store(self, read_only: bool = True) -> Any:
        raise NotImplementedError

    def where(self, key: str) -> str:
        return f"{self.location}/{key}" if key else str(self.location)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def get_checked(self, key: str, nbytes: int | None = None,
                    check: Callable[[bytes | memoryview], None] | None = None) -> bytes | memoryview:
        """``get`` with retries; a body of the wrong size, or one ``check`` rejects, counts as a failed try."""
        def once() -> bytes | memoryview:
            data = self.get(key, nbytes)
            if nbytes is not None and len(data) != nbytes:
                raise CacheError(f"{self.where(key)}: got {len(data)} bytes, expected {nbytes}")
            if check is not None:
                check(data)
            return data
        return self.retrying(once, key)

    def retrying(self, fn: Callable[[], T], key: str) -> T:
        """Run ``fn``; a transport error, a short body or a checksum mismatch is retried with backoff,
        then reported as one line naming the object. A missing object is not retried."""
        last: BaseException | None = None
        for attempt in range(RETRIES):
            try:
                return fn()
            except KeyMissing:
                raise
            except (CacheError, OSError, RuntimeError, ValueError, TimeoutError) as exc:
                last = exc
                if attempt + 1 < RETRIES:
                    time.sleep(min(2.0, 0.1 * 3 ** attempt))
        assert last is not None
        msg = _one_line(last)
        if isinstance(last, CacheError) and msg.startswith(self.where(key)):
            raise CacheError(f"{msg} (after {RETRIES} tries)") from None
        raise CacheError(f"{self.where(key)}: read failed after {RETRIES} tries ({msg})") from None


class LocalStore(Store):
    """A folder. Writes go to ``.tmp/`` and are renamed into place, so a reader or a killed writer
    never leaves a half-written file under a content key; the leftovers of dead writers in ``.tmp/``
    are swept by ``sweep_tmp``."""

    def __init__(self, root: Path) -> None:
        self.location = root
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def open_file(self, key: str) -> tuple[int, int]:
        """(descriptor, size) of the regular file under ``key``, opened read-only.

        Only a regular file inside the cache is accepted: the last component is opened with
        O_NOFOLLOW (a symlink is refused, wherever it points), the folders above it must resolve
        inside the cache root, and the opened file must be a regular file (fstat), not a device
        such as /dev/zero or a FIFO; O_NONBLOCK keeps the open of a FIFO from waiting for a
        writer. The caller closes the descriptor."""
        path = self._path(key)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise KeyMissing(f"{path}: missing") from None
        except IsADirectoryError:
            raise KeyMissing(f"{path}: is a folder, expected a file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CacheError(f"{path}: is a symbolic link; a cache holds only regular files") from None
            if exc.errno == errno.ENOTDIR:
                raise KeyMissing(f"{path}: missing") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "a folder" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
                raise CacheError(f"{path}: is {what}; a cache holds only regular files")
            self._check_inside(path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def _check_inside(self, path: Path) -> None:
        """The folder holding ``path`` resolves inside the cache root (no symlinked folder leads out)."""
        root = os.path.realpath(self.root)
        parent = os.path.realpath(path.parent)
        if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
            raise CacheError(f"{path}: its folder resolves to {parent}, outside the cache {root}; a cache holds "
                             f"only regular files (no symbolic links)")

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The bytes of ``key``; with ``limit``, at most limit + 1 of them (enough to tell a wrong size)."""
        fd, size = self.open_file(key)
        try:
            want = size if limit is None else min(size, limit + 1)
            parts, got = [], 0
            while got < want:
                part = os.read(fd, min(want - got, 1 << 26))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | memoryview) -> None:
        target = self._path(key)
        tmp_dir = self.root / TMP_DIR
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_dir / f"{uuid.uuid4().hex}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise CacheError(f"{target}: cannot write ({exc.strerror or exc})") from None

    def size(self, key: str) -> int | None:
        """Size of the file under ``key`` (not following a symlink: a link's own size never matches a
        recorded one, and reading it is refused)."""
        try:
            st = os.lstat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self.root / prefix if prefix else self.root
        out: dict[str, int] = {}
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d not in (TMP_DIR,)]
                filenames = [f for f in filenames if f != LOCK_FILE]
            for name in dirnames:
                if os.path.islink(os.path.join(dirpath, name)):
                    raise CacheError(f"{os.path.join(dirpath, name)}: is a symbolic link; a cache holds only "
                                     f"regular files and folders")
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise CacheError(f"{os.path.join(dirpath, name)}: is {_kind(st.st_mode)}; a cache holds only "
                                     f"regular files")
                out[key] = st.st_size
        return out

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def zarr_store(self, read_only: bool = True) -> Any:
        import zarr

        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def sweep_tmp(self) -> int:
        """Remove temporary files of writers that are no longer running; returns how many."""
        from .locking import pid_alive

        folder = self.root / TMP_DIR
        removed = 0
        if not folder.is_dir():
            return 0
        for f in folder.iterdir():
            pid = f.name.rsplit(".", 1)[-1]
            if pid.isascii() and pid.isdigit() and not pid_alive(int(pid)):
                try:
                    f.unlink()
                    removed += 1
                except OSError:
                    pass
        return removed


def _kind(mode: int) -> str:
    """What a non-regular directory entry is, for an error line."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@dataclass
class _Opened:
    stores: dict[tuple[str, tuple[tuple[str, str], ...]], Store] = field(default_factory=dict)


_OPENED = _Opened()


def open_store(where: str | Path | RemotePath, options: dict[str, str] | None = None) -> Store:
    """The store of a cache location; ``options`` default to the process's ``--storage-option`` values."""
    loc = parse_location(where)
    if isinstance(loc, Path):
        return LocalStore(loc)
    opts = dict(_DEFAULTS if options is None else options)
    cache_key = (loc.url, tuple(sorted(opts.items())))
    store = _OPENED.stores.get(cache_key)
    if store is None:
        scheme = loc.url.split("://", 1)[0]
        from .remote import FsspecStore, ObjectStore

        store = ObjectStore(loc, opts) if scheme in OBSTORE_SCHEMES else FsspecStore(loc, opts)
        _OPENED.stores[cache_key] = store
    return store


def iter_chunked(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
