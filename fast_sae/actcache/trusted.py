"""Chunk files already verified, remembered across processes, so a trusted local cache is not hashed
again by every new process (the first training pass then reads at the speed of a raw read).

Why: every chunk's xxh3 is checked before its first use in a process; on a local cache that is read
by many runs (a sweep, every epoch-1 of every training) the same unchanged files were hashed again
each time, which held a first pass to 0.41 of a raw read. A chunk file is verified once (when the
harvest writes it, by ``info --verify``, or by the first reader), and the verification is recorded
against the file's identity: (size, mtime_ns, inode, ctime_ns, device). A later process skips the
hash while the file still has that identity, the cache's index still records the same checksum,
and the record's MAC checks out. Any write through the filesystem changes mtime and ctime (ctime
cannot be set back from user space), so a changed file is hashed again; see cache_layout.md for what
this still catches and what it no longer does.

The record: ``$FAST_SAE_HOME/verified/<hash of the cache's absolute path>.log``, one line per
verification, ``key size mtime_ns ino ctime_ns dev digest mac``, appended (O_APPEND: concurrent
readers of one cache each add whole lines); the last valid line for a key wins. The MAC is a keyed
BLAKE2b over the cache path, the key, the identity and the digest, with a per-user secret in
``$FAST_SAE_HOME/verified/.key`` (mode 0600): a line that was edited, copied from another cache or
written by anything but a verifier does not check out and is ignored (the chunk is hashed).
``FAST_SAE_VERIFIED_RECORD`` = a folder keeps the records there instead; ``off`` turns them off
(every process hashes every chunk again).
Records live outside the cache, so read-only and shared caches work and nothing is written into them.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

KEY_BYTES = 32
SWITCH_ENV = "FAST_SAE_VERIFIED_RECORD"


def _home() -> Path:
    return Path(os.environ.get("FAST_SAE_HOME") or Path.home() / ".cache" / "fast-sae")


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What any change to a file through the filesystem changes (ctime cannot be set back)."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev


def _secret(folder: Path) -> bytes:
    """The per-user MAC key, created once (atomically: written aside, then linked into place)."""
    path = folder / ".key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        tmp = folder / f".key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise OSError(f"{path}: expected {KEY_BYTES} bytes")
    return key


class VerifiedRecord:
    """Which chunk files of one local cache were verified, and as which file identity."""

    def __init__(self, cache_root: Path) -> None:
        self.root = str(Path(cache_root).resolve())
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[tuple[int, ...], int]] = {}
        self._key: bytes | None = None
        self.file: Path | None = None
        if os.environ.get(SWITCH_ENV) == "off":
            return
        try:
            setting = os.environ.get(SWITCH_ENV)
            folder = Path(setting) if setting else _home() / "verified"
            folder.mkdir(parents=True, exist_ok=True)
            self._key = _secret(folder)
            self.file = folder / (hashlib.sha256(self.root.encode()).hexdigest()[:32] + ".log")
            self._load()
        except OSError:  # no writable home: every chunk is hashed, as without the record
            self._key, self.file = None, None

    def _mac(self, key: str, ident: tuple[int, ...], digest: int) -> str:
        assert self._key is not None
        msg = f"{self.root}\0{key}\0{' '.join(map(str, ident))}\0{digest:016x}".encode()
        return hashlib.blake2b(msg, key=self._key, digest_size=16).hexdigest()

    def _load(self) -> None:
        assert self.file is not None
        try:
            text = self.file.read_text(errors="replace")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) != 8:
                continue  # a torn or foreign line
            try:
                ident, digest = tuple(int(p) for p in parts[1:6]), int(parts[6], 16)
            except ValueError:
                continue
            if hmac.compare_digest(parts[7], self._mac(parts[0], ident, digest)):
                self._entries[parts[0]] = (ident, digest)

    @property
    def enabled(self) -> bool:
        return self.file is not None

    def trusted(self, key: str, st: os.stat_result, digest: int | None) -> bool:
        """Was this chunk file verified against ``digest`` while it had the identity ``st`` has now?"""
        if digest is None or not self.enabled:
            return False
        return self._entries.get(key) == (identity(st), digest)

    def add(self, key: str, before: os.stat_result, path: Path, digest: int) -> None:
        """Record that the file at ``path`` hashed to ``digest``; ``before``: its stat taken before the
        bytes were read. Recorded only if the file did not change meanwhile."""
        if not self.enabled:
            return
        try:
            ident = identity(os.stat(path))
        except OSError:
            return
        if ident != identity(before) or self._entries.get(key) == (ident, digest):
            return
        line = f"{key} {' '.join(map(str, ident))} {digest:016x} {self._mac(key, ident, digest)}\n"
        assert self.file is not None
        with self._lock:
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError:
                return
            self._entries[key] = (ident, digest)
