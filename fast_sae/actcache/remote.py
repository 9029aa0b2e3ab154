"""Stores of remote cache locations: obstore (S3, GCS, Azure, HTTP, memory) and, for any other
scheme, zarr's fsspec store.

Why obstore: one dependency-free wheel around the Rust ``object_store`` crate of Apache Arrow;
its network I/O runs off the GIL, which lets a read-ahead keep several chunks in flight from
Python threads, and it reads the usual environment variables for credentials and endpoints.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from .layout import CacheError
from .location import RemotePath
from .store import KeyMissing, Store, _one_line

T = TypeVar("T")
# obstore client options (HTTP layer); every other --storage-option key goes to the store's config.
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "pool_idle_timeout",
                "pool_max_idle_per_host", "http1_only", "http2_only", "proxy_url", "user_agent",
                "default_content_type", "http2_keep_alive_interval", "http2_keep_alive_timeout"}


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
            # config is a plain dict whose keys depend on the scheme: not one of from_url's typed overloads
            from_url: Any = obstore.store.from_url
            self.store = from_url(location.url, config=config or None, client_options=client,
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

    def get(self, key: str, limit: int | None = None) -> memoryview:
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

    def get(self, key: str, limit: int | None = None) -> bytes:
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
