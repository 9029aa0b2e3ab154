"""Advisory locks of a local cache, and the sweeping of what dead writers left behind.

Why a byte-range lock on one file: harvest workers of one cache must run side by side, but two
copies of the same worker (or two plain harvests) must not write the same chunks at once. Each
writer locks exactly the chunk indices it is going to write, as the byte range [first, last + 1)
of ``CACHE/.lock`` (POSIX ``fcntl`` record locks: released by the kernel when the process dies,
so a killed worker never leaves a stale lock). Disjoint shares coexist; overlapping ones get one
clear line. The lock is advisory and local: object stores have no such lock (cache_layout.md).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from .layout import CacheError
from .store import LOCK_FILE


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChunkLock:
    """Holds an exclusive lock on chunk indices [first, stop) of a local cache until ``release``."""

    def __init__(self, root: Path, first: int, stop: int, what: str) -> None:
        self.fd = -1
        if stop <= first:
            return
        path = root / LOCK_FILE
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheError(f"{path}: cannot open the lock file ({exc.strerror})") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, stop - first, first, os.SEEK_SET)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise CacheError(f"{root}: another harvest is writing {what} (chunks {first}..{stop - 1} are "
                                 f"locked in {path}); wait for it, or give each worker its own --worker I/N"
                                 ) from None
            raise CacheError(f"{path}: cannot lock ({exc.strerror})") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the record lock
            self.fd = -1


def sweep_creating(path: Path) -> list[Path]:
    """Remove ``NAME.creating-<pid>`` folders beside ``path`` whose process is gone (never a live one's)."""
    removed: list[Path] = []
    parent = path.parent
    if not parent.is_dir():
        return removed
    prefix = path.name + ".creating-"
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):]
        if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
