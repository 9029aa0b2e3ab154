"""Copying a complete cache between locations (local folder <-> object store, either direction).

Why not ``aws s3 sync`` / ``cp -r``: a copy must never produce something that looks like a cache
but is not one. So the source must be complete; every file that has a recorded checksum is checked
on the way (a damaged source chunk stops the copy instead of spreading); the destination's root
``zarr.json`` is written last, so an interrupted copy is not a cache and a rerun resumes it: files
already at the destination are kept when their size and checksum match, and copied otherwise.
For the same reason the destination must be new, empty, the same cache or an earlier copy of it
(a folder with other files would end up inside a "complete" cache), never inside the source, and
the temp files of copies killed earlier are removed once a copy completes.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .commits import read_records
from .integrity import checksum
from .layout import CacheError
from .reader import ActivationCache
from .store import KeyMissing, LocalStore, RemotePath, Store, open_store, parse_location


@dataclass
class CopyResult:
    files: int
    copied: int  # files transferred this run
    kept: int  # files already at the destination and verified
    bytes_copied: int


def _recorded(cache: ActivationCache) -> dict[str, tuple[int, str]]:
    """Stored size and checksum of every file the source records one for."""
    out: dict[str, tuple[int, str]] = {}
    if cache.meta.format_version >= 2:
        for rec in read_records(cache.store, list(range(cache.n_chunks))).values():
            out.update(rec.files)
    return out


def copy_cache(src: str | Path | RemotePath, dst: str | Path | RemotePath, options: dict[str, str] | None = None,
               progress: Callable[[int], None] | None = None, threads: int = 8) -> CopyResult:
    src_loc, dst_loc = parse_location(src), parse_location(dst)
    _check_places(src_loc, dst_loc)
    cache = ActivationCache.open(src_loc, require_complete=True, options=options)
    source = cache.store
    dest = open_store(dst_loc, options)
    root = bytes(source.retrying(lambda: source.get("zarr.json"), "zarr.json"))
    try:
        existing_root = bytes(dest.get("zarr.json"))
    except KeyMissing:
        existing_root = None
    if existing_root is not None and existing_root != root:
        raise CacheError(f"{dest.where('zarr.json')}: the destination holds another cache; use another destination")
    files = source.list()
    have = dest.list()
    foreign = sorted(k for k in have if k not in files)
    if foreign:  # not empty, and not (a partial copy of) this cache: its files would end up inside the cache
        raise CacheError(f"{dest.where(foreign[0])}: the destination holds files that are not part of this cache "
                         f"({len(foreign)} such); copy into a new or empty folder, or into an earlier copy of "
                         f"the same cache to resume it")
    files.pop("zarr.json", None)
    recorded = _recorded(cache)

    def one(key: str) -> tuple[int, int]:
        """(bytes copied, 1 if kept)"""
        size = files[key]
        want = recorded.get(key)
        if want is not None and want[0] != size:
            raise CacheError(f"{source.where(key)}: {size} bytes, recorded {want[0]}; the source is damaged")
        if have.get(key) == size:
            current = dest.get_checked(key, size)
            reference = want[1] if want is not None else checksum(source.get_checked(key, size))
            if checksum(current) == reference:
                return 0, 1

        def check(data: bytes | memoryview) -> None:
            if want is not None and checksum(data) != want[1]:
                raise CacheError(f"{source.where(key)}: checksum mismatch (recorded {want[1]}, read "
                                 f"{checksum(data)}); the source is damaged")
        data = source.get_checked(key, size, check)
        dest.put(key, data)
        return size, 0

    copied = kept = nbytes = 0
    workers = 1 if isinstance(source, LocalStore) and isinstance(dest, LocalStore) else threads
    with ThreadPoolExecutor(workers) as pool:
        for key, (n, k) in zip(sorted(files), pool.map(one, sorted(files))):
            copied += 1 - k
            kept += k
            nbytes += n
            if progress is not None:
                progress(files[key])
    dest.put("zarr.json", root)  # the commit point: the destination is a cache from here on
    if isinstance(dest, LocalStore):
        dest.sweep_tmp()  # temp files of copies killed before this one finished
    ActivationCache.open(dst_loc, require_complete=True, options=options)  # validates what arrived
    return CopyResult(files=len(files) + 1, copied=copied + 1, kept=kept, bytes_copied=nbytes + len(root))


def _check_places(src: Path | RemotePath, dst: Path | RemotePath) -> None:
    """Refuse a destination that is the source, lies inside it, or is an existing file."""
    if isinstance(src, Path) and isinstance(dst, Path):
        a, b = src.resolve(), dst.resolve()
        if a == b:
            raise CacheError(f"{dst}: source and destination are the same")
        if a in b.parents:
            raise CacheError(f"{dst}: the destination lies inside the source cache {src}; copy it elsewhere")
    elif isinstance(src, RemotePath) and isinstance(dst, RemotePath):
        if src.url == dst.url:
            raise CacheError(f"{dst}: source and destination are the same")
        if dst.url.startswith(src.url.rstrip("/") + "/"):
            raise CacheError(f"{dst}: the destination lies inside the source cache {src}; copy it elsewhere")
    if isinstance(dst, Path) and dst.exists() and not dst.is_dir():
        raise CacheError(f"{dst}: exists and is not a folder; name a new or empty folder")


def total_bytes(store: Store) -> int:
    return sum(store.list().values())
