"""Atomic, resumable training checkpoints, stored without pickle.

Why a step folder plus a LATEST pointer: with several processes each writing its own state file,
no single file rename can make the whole checkpoint appear at once. Each process writes
``step_N/rank{r}.safetensors`` and ``rank{r}.json`` (temp file + rename, statefile.py), all wait at
a barrier, then rank 0 atomically replaces ``LATEST``; only then are older step folders removed. A
kill at any moment leaves LATEST pointing at a complete checkpoint (or at none). The data position
needs no saving beyond the step: the batch order is a pure function of (seed, step) (buffer.py).

Nothing read back is executed: tensors come from safetensors and the rest from JSON. A checkpoint
in the old pickle format (``rank{r}.pt``) is refused, never unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .distributed import Dist
from .errors import RunError
from .resume import is_int
from .runfiles import remove_stale_temps
from .statefile import StateFormatError, load_state, save_state

LATEST = "LATEST"


class Checkpointer:
    def __init__(self, run_dir: Path, d: Dist, echo: Callable[[str], None] = print) -> None:
        self.dir = run_dir / "checkpoint"
        self.d = d
        self.echo = echo
        self.loaded: tuple[str, int] = ("", 0)  # (state file, LATEST's step) of the last load

    def latest(self) -> dict[str, Any] | None:
        f = self.dir / LATEST
        if not f.is_file():
            return None
        try:
            info = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            info = None
        if not isinstance(info, dict):
            raise RunError(f"{f}: corrupt checkpoint pointer (not a JSON object); delete {self.dir} to restart")
        step, folder, world = info.get("step"), info.get("folder"), info.get("world_size", 1)
        bad = None
        if not is_int(step) or step < 0:
            bad = f"field 'step' is {str(step)[:40]}, expected a non-negative integer"
        elif not isinstance(folder, str) or not re.fullmatch(r"step_[0-9]{10}", folder) or int(folder[5:]) != step:
            bad = f"field 'folder' is {str(folder)[:40]}, expected step_{step:010d}"
        elif not is_int(world) or not 1 <= world <= 1 << 20:
            bad = f"field 'world_size' is {str(world)[:40]}, expected a positive integer"
        if bad is not None:
            raise RunError(f"{f}: corrupt checkpoint pointer ({bad}); delete {self.dir} to restart")
        return info

    def save(self, step: int, state: dict[str, Any]) -> None:
        folder = self.dir / f"step_{step:010d}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_state(folder / f"rank{self.d.rank}", state)
        except OSError as exc:  # a full disk, a read-only folder: one line, the run stays resumable
            raise RunError(f"{folder}: cannot write checkpoint ({exc.strerror or exc}); the previous checkpoint "
                           f"is kept, free space and rerun to resume") from None
        self.d.barrier()
        if self.d.main:
            pointer = self.dir / LATEST
            ptmp = self.dir / f"{LATEST}.tmp-{os.getpid()}"
            try:
                ptmp.write_text(json.dumps({"step": step, "folder": folder.name, "world_size": self.d.world}))
                os.replace(ptmp, pointer)
            except OSError as exc:
                ptmp.unlink(missing_ok=True)
                raise RunError(f"{pointer}: cannot write ({exc.strerror or exc}); free space and rerun") from None
            for old in self.dir.glob("step_*"):
                if old.name != folder.name:
                    shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()

    def _tidy(self, keep: str | None) -> None:
        """Main process, before loading: drop temp files of dead writers and step folders LATEST does
        not name (a kill during save's clean-up leaves them; they would fill the disk)."""
        if not self.dir.is_dir():
            return
        remove_stale_temps(self.dir)
        for folder in self.dir.glob("step_*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir():
                remove_stale_temps(folder)

    def load(self) -> dict[str, Any] | None:
        info = self.latest()
        if self.d.main:
            self._tidy(info["folder"] if info else None)
        self.d.barrier()
        if info is None:
            return None
        if info.get("world_size", 1) != self.d.world:
            raise RunError(f"{self.dir}: checkpoint taken with {info.get('world_size')} processes, now "
                           f"{self.d.world}; resume with the same number of processes")
        folder = self.dir / info["folder"]
        if not folder.is_dir():
            # A stale pointer: its folder is gone (deleted by hand, or a kill while removing the
            # checkpoint). There is nothing to resume from; start over, and say so.
            self.d.barrier()
            if self.d.main:
                self.echo(f"{self.dir / LATEST} names {info['folder']}, which does not exist; starting from step 0")
                (self.dir / LATEST).unlink(missing_ok=True)
            self.d.barrier()
            return None
        stem = folder / f"rank{self.d.rank}"
        if stem.with_suffix(".pt").is_file() and not stem.with_name(stem.name + ".json").is_file():
            raise RunError(f"{stem.with_suffix('.pt')}: checkpoint in the old pickle format, which is never loaded "
                           f"(unpickling can run code); delete {self.dir} to restart")
        try:
            state = load_state(stem)
        except StateFormatError as exc:
            raise RunError(f"{exc}; delete {self.dir} to restart") from None
        if not isinstance(state, dict) or not {"step", "groups", "optims", "torch_rng"} <= set(state):
            raise RunError(f"{stem}.json: not a training checkpoint (fields step, groups, optims, torch_rng); "
                           f"delete {self.dir} to restart")
        self.loaded = (f"{stem}.json", int(info["step"]))
        return state  # not yet checked against the run: resume.check_state does that before any use

    def remove(self) -> None:
        self.d.barrier()
        if self.d.main:
            shutil.rmtree(self.dir, ignore_errors=True)
