"""Cache locations: a local folder or a URL, and the connection settings of remote ones.

Why a small type of our own for URLs: ``pathlib`` collapses ``s3://bucket/p`` to ``s3:/bucket/p``
(click.Path does it too), so a URL must never travel as a Path; ``RemotePath`` stands where a
cache's ``path`` is shown or compared, and ``parse_location`` reads a collapsed one back.
Connection settings (``--storage-option``) are deliberately kept out of every run configuration:
they may hold secrets and must never be written into a cache, a run folder or a log.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fast_sae.options import setting
from fast_sae.redact import redact_url, remember_options

from .layout import CacheError

OBSTORE_SCHEMES = ("s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss", "http", "https", "memory")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/([^/].*)$")  # what pathlib makes of "s3://b/p"
_COLLAPSED_INSIDE = re.compile(r"(?:^|/)([A-Za-z][A-Za-z0-9+.-]*):/([^/].*)$")  # ... and of Path(url).resolve()


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
    remember_options(out)  # so that no message or file shows them (fast_sae/redact.py)
    return out


_DEFAULT_OPTIONS: dict[str, str] = {}


def set_default_storage_options(options: dict[str, str]) -> None:
    """Options every remote location opened by this process uses unless given others (set by the CLI)."""
    _DEFAULT_OPTIONS.clear()
    _DEFAULT_OPTIONS.update(options)


@dataclass(frozen=True)
class RemotePath:
    """A remote cache location, usable where a cache's ``path`` is shown or compared."""

    url: str  # as given, credentials included: only ever handed to the store client

    def __str__(self) -> str:
        """The URL as it may be shown or recorded: user-info and credential query values hidden."""
        return redact_url(self.url)

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
