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

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fast_sae.options import setting

from .layout import CacheError

T = TypeVar("T")

OBSTORE_SCHEMES = ("s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http", "https", "memory")
# obstore client options (HTTP layer); every other --storage-option key goes to the store's config.
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "pool_idle_timeout",
                "pool_max_idle_per_host", "http1_only", "http2_only", "proxy_url", "user_agent",
                "default_content_type", "http2_keep_alive_interval", "http2_keep_alive_timeout"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/([^/].*)$")  # what pathlib makes of "s3://b/p"
_COLLAPSED_INSIDE = re.compile(r"(?:^|/)([A-Za-z][A-Za-z0-9+.-]*):/([^/].*)$")  # ... and of Path(url).resolve()
TMP_DIR = ".tmp"  # local caches: temporary files, renamed into place (never part of the content)
LOCK_FILE = ".lock"  # local caches: the advisory lock file (never part of the content)
RETRIES = 4


@dataclass
class StorageConfig:
    """Connection settings of a remote cache location; shared by every stage's command line.

    They are deliberately not part of any run configuration: they may hold secrets, and a cache or
    a run must not change meaning because it was reached through another endpoint."""

    storage_option: list[str] = setting(
        default_factory=list, flag="storage-option", metavar="KEY=VALUE,...",
        help="Options of a remote cache location (e.g. endpoint=http://127.0.0.1:8333,region=us-east-1); "
             "credentials belong in the environment (AWS_ACCESS_KEY_ID, ...). Never written anywhere.")

    def options(self) -> dict[str, str]:
        return parse_storage_options(self.storage_option)


def parse_storage_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CacheError(f"--storage-option {item.split('=')[0]!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


_DEFAULT_OPTIONS: dict[str, str] = {}


def set_default_storage_options(options: dict[str, str]) -> None:
    """Options every remote location opened by this process uses unless given others (set by the CLI)."""
    _DEFAULT_OPTIONS.clear()
    _DEFAULT_OPTIONS.update(options)


@dataclass(frozen=True)
class RemotePath:
    """A remote cache location, usable where a cache's ``path`` is shown or compared."""

    url: str

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # refuse silently turning a URL into a local path
        raise TypeError(f"{self.url} is a remote location, not a local path")

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def resolve(self) -> RemotePath:
        return self

    def __truediv__(self, key: str) -> RemotePath:
        return RemotePath(f"{self.url.rstrip('/')}/{key}")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Path):  # pathlib collapsed the URL, perhaps after making it absolute
            m = _COLLAPSED_INSIDE.search(str(other))
            return m is not None and f"{m.group(1).lower()}://{m.group(2).rstrip('/')}" == self.url
        if isinstance(other, str):
            return parse_location(other) == self
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


def parse_location(where: str | Path | RemotePath) -> Path | RemotePath:
    """A local folder (Path) or a remote URL (RemotePath). ``Path("s3://b/p")`` (which pathlib
    collapses to ``s3:/b/p``, e.g. after click.Path) is read back as the URL it was."""
    if isinstance(where, RemotePath):
        return where
    text = str(where)
    m = _URL.match(text)
    if m is None and isinstance(where, Path):
        m = _COLLAPSED.match(text)
        if m is not None and m.group(1).lower() not in OBSTORE_SCHEMES and not _fsspec_knows(m.group(1)):
            m = None
    if m is None:
        return Path(text)
    scheme, rest = m.group(1).lower(), m.group(2).rstrip("/")
    if scheme == "file":
        return Path("/" + rest.lstrip("/"))
    if not rest:
        raise CacheError(f"{text}: a cache URL needs a bucket or host (e.g. s3://bucket/prefix)")
    return RemotePath(f"{scheme}://{rest}")


def _fsspec_knows(scheme: str) -> bool:
    try:
        import fsspec

        return scheme.lower() in fsspec.available_protocols()
    except ImportError:
        return False


def is_remote(where: str | Path | RemotePath) -> bool:
    return isinstance(parse_location(where), RemotePath)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


class KeyMissing(CacheError):
    """The object does not exist."""


class Store:
    """Bytes by key under one cache location. Keys use '/' and are relative to the cache root."""

    location: Path | RemotePath

    def get(self, key: str) -> bytes | memoryview:
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
            data = self.get(key)
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

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyMissing(f"{self._path(key)}: missing") from None
        except IsADirectoryError:
            raise KeyMissing(f"{self._path(key)}: is a folder, expected a file") from None

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
        try:
            st = os.stat(self._path(key))
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
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                try:
                    out[key] = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
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
            if pid.isdigit() and not pid_alive(int(pid)):
                try:
                    f.unlink()
                    removed += 1
                except OSError:
                    pass
        return removed


class ObjectStore(Store):
    """An obstore store (S3, GCS, Azure, HTTP, memory). Each put is one atomic PUT."""

    def __init__(self, location: RemotePath, options: dict[str, str]) -> None:
        import obstore.store

        self.location = location
        config: dict[str, Any] = {}
        client: dict[str, Any] = {"connect_timeout": "10s", "timeout": "120s"}
        for key, value in options.items():
            (client if key in _CLIENT_KEYS else config)[key] = value
        endpoint = (config.get("endpoint") or config.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT") or "")
        if endpoint.startswith("http://") or location.url.startswith("http://") or \
                os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true"):
            client.setdefault("allow_http", True)  # a plain-HTTP endpoint (a local test server, a LAN store)
        try:
            self.store = obstore.store.from_url(location.url, config=config or None, client_options=client,
                                                retry_config={"max_retries": 3, "retry_timeout": _seconds(60)})
        except Exception as exc:  # obstore raises its own errors for bad URLs and unknown keys
            raise CacheError(f"{location}: cannot open the object store ({_one_line(exc)})") from None

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        import obstore.exceptions as ox

        try:
            return fn()
        except (FileNotFoundError, ox.NotFoundError):
            raise KeyMissing(f"{self.where(key)}: missing") from None
        except (ox.PermissionDeniedError, ox.UnauthenticatedError) as exc:
            raise CacheError(f"{self.where(key)}: access denied by the store; check the credentials in the "
                             f"environment ({_one_line(exc)})") from None
        except ox.BaseError as exc:
            raise OSError(_one_line(exc)) from None

    def get(self, key: str) -> memoryview:
        import obstore

        return memoryview(self._call(key, lambda: obstore.get(self.store, key).bytes()))

    def put(self, key: str, data: bytes | memoryview) -> None:
        import obstore

        def once() -> None:
            self._call(key, lambda: obstore.put(self.store, key, bytes(data) if isinstance(data, memoryview)
                                                else data))
        try:
            self.retrying(once, key)
        except CacheError as exc:
            raise CacheError(str(exc).replace("read failed", "write failed")) from None

    def size(self, key: str) -> int | None:
        import obstore

        try:
            return int(self.retrying(lambda: self._call(key, lambda: obstore.head(self.store, key)), key)["size"])
        except KeyMissing:
            return None

    def list(self, prefix: str = "") -> dict[str, int]:
        import obstore

        def once() -> dict[str, int]:
            out: dict[str, int] = {}
            stream = obstore.list(self.store, prefix=prefix.rstrip("/") + "/" if prefix else None)
            for batch in stream:
                for meta in batch:
                    out[meta["path"]] = int(meta["size"])
            return out
        return self.retrying(lambda: self._call(prefix, once), prefix)

    def delete(self, key: str) -> None:
        import obstore

        try:
            self._call(key, lambda: obstore.delete(self.store, key))
        except KeyMissing:
            pass

    def zarr_store(self, read_only: bool = True) -> Any:
        import warnings

        import zarr

        with warnings.catch_warnings():  # zarr calls its obstore adapter experimental
            warnings.simplefilter("ignore")
            return zarr.storage.ObjectStore(self.store, read_only=read_only)


class FsspecStore(Store):
    """Any other scheme, through zarr's fsspec store (needs fsspec and the scheme's package)."""

    def __init__(self, location: RemotePath, options: dict[str, str]) -> None:
        import zarr

        self.location = location
        try:
            self.zstore = zarr.storage.FsspecStore.from_url(location.url, storage_options=dict(options),
                                                            read_only=False)
        except Exception as exc:  # unknown protocol, missing package, bad options
            raise CacheError(f"{location}: no store for this URL ({_one_line(exc)})") from None

    def _sync(self, key: str, coro: Any) -> Any:
        from zarr.core.sync import sync

        try:
            return sync(coro)
        except FileNotFoundError:
            raise KeyMissing(f"{self.where(key)}: missing") from None

    def get(self, key: str) -> bytes:
        from zarr.core.buffer import default_buffer_prototype

        buf = self._sync(key, self.zstore.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            raise KeyMissing(f"{self.where(key)}: missing")
        return buf.to_bytes()

    def put(self, key: str, data: bytes | memoryview) -> None:
        from zarr.core.buffer import default_buffer_prototype

        buf = default_buffer_prototype().buffer.from_bytes(bytes(data))
        self.retrying(lambda: self._sync(key, self.zstore.set(key, buf)), key)

    def size(self, key: str) -> int | None:
        try:
            return int(self._sync(key, self.zstore.getsize(key)))
        except KeyMissing:
            return None

    def list(self, prefix: str = "") -> dict[str, int]:
        async def collect() -> list[str]:
            return [k async for k in self.zstore.list_prefix(prefix)]
        keys = self._sync(prefix, collect())
        return {k: int(self._sync(k, self.zstore.getsize(k))) for k in keys}

    def delete(self, key: str) -> None:
        self._sync(key, self.zstore.delete(key))

    def zarr_store(self, read_only: bool = True) -> Any:
        return self.zstore.with_read_only(read_only)


def _seconds(n: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=n)


@dataclass
class _Opened:
    stores: dict[tuple[str, tuple[tuple[str, str], ...]], Store] = field(default_factory=dict)


_OPENED = _Opened()


def open_store(where: str | Path | RemotePath, options: dict[str, str] | None = None) -> Store:
    """The store of a cache location; ``options`` default to the process's ``--storage-option`` values."""
    loc = parse_location(where)
    if isinstance(loc, Path):
        return LocalStore(loc)
    opts = dict(_DEFAULT_OPTIONS if options is None else options)
    cache_key = (loc.url, tuple(sorted(opts.items())))
    store = _OPENED.stores.get(cache_key)
    if store is None:
        scheme = loc.url.split("://", 1)[0]
        store = ObjectStore(loc, opts) if scheme in OBSTORE_SCHEMES else FsspecStore(loc, opts)
        _OPENED.stores[cache_key] = store
    return store


def iter_chunked(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
