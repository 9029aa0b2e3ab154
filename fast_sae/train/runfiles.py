"""The run folder's housekeeping: one writer at a time, no leftovers of dead writers, a metrics
file that survives a kill mid-line.

Why an advisory ``fcntl`` lock: two ``train`` processes on one ``--out`` would interleave
checkpoints and metrics lines; the lock makes the second one stop at once with a clear line. The
kernel drops it when its holder dies, so a killed run never leaves a lock to clean up by hand.
Temp names end in ``.tmp-<pid>`` / ``.old-<pid>`` (atomic writes): one whose pid no longer runs
is a leftover of a killed writer and is removed.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import RunError

LOCK = "run.lock"
_TEMP = re.compile(r"\.(?:tmp|old)-([0-9]+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path, prefix: str = "") -> list[Path]:
    """Remove ``<prefix>*.tmp-<pid>`` / ``.old-<pid>`` entries of ``folder`` whose pid is not running."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.search(p.name)
        if not m or not p.name.startswith(prefix) or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class RunLock:
    """An exclusive advisory lock on a run folder, held until ``release`` (or the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by another training process (pid {holder}, lock "
                           f"{self.path}); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_metrics(f: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a torn last line (a kill mid-write) is dropped, a bad line before
    the last one is an error naming it."""
    return [row for _, row in _lines(f)]


def _lines(f: Path) -> list[tuple[str, dict[str, Any]]]:
    if not f.is_file():
        return []
    lines = f.read_text(encoding="utf-8", errors="replace").split("\n")
    rows: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if n == len(lines) or all(not rest.strip() for rest in lines[n:]):
                break  # the torn tail of an interrupted append
            raise RunError(f"{f} line {n}: not a JSON object; the metrics file is damaged (move it away to resume)")
        rows.append((line, row))
    return rows


def truncate_metrics(f: Path, step: int) -> None:
    """Keep the train lines up to ``step`` so a resumed run's file equals an uninterrupted one's."""
    if not f.is_file():
        return
    rows = _lines(f)
    for n, (_, r) in enumerate(rows, 1):
        value = r.get("step", 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunError(f"{f} row {n}: field 'step' is {str(value)[:40]}, expected an integer; the metrics file "
                           f"is damaged (move it away to resume)")
    keep = [line for line, r in rows if r.get("step", 0) <= step and r.get("split") == "train"]
    write_text_atomic(f, "".join(line + "\n" for line in keep))


def append_jsonl(f: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write, flushed to disk, so a kill leaves at most one torn last line."""
    try:
        with open(f, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise RunError(f"{f}: cannot append ({exc.strerror or exc}); free space and rerun to resume") from None


def write_text_atomic(f: Path, text: str) -> None:
    """Replace ``f`` whole (temp file + rename); a full disk is one line and leaves ``f`` as it was."""
    tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, f)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{f}: cannot write ({exc.strerror or exc}); free space and rerun") from None
