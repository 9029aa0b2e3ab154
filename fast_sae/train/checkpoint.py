"""Atomic, resumable training checkpoints.

Why a step folder plus a LATEST pointer: with several processes each writing its own state file,
no single file rename can make the whole checkpoint appear at once. Each process writes
``step_N/rank{r}.pt`` (temp file + rename), all wait at a barrier, then rank 0 atomically replaces
``LATEST``; only then are older step folders removed. A kill at any moment leaves LATEST pointing
at a complete checkpoint (or at none). The data position needs no saving beyond the step: the
batch order is a pure function of (seed, step) (see buffer.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .distributed import Dist

LATEST = "LATEST"


class Checkpointer:
    def __init__(self, run_dir: Path, d: Dist) -> None:
        self.dir = run_dir / "checkpoint"
        self.d = d

    def latest(self) -> dict[str, Any] | None:
        f = self.dir / LATEST
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError:
            raise RuntimeError(f"{f}: corrupt checkpoint pointer; delete the checkpoint folder to restart") from None

    def save(self, step: int, state: dict[str, Any]) -> None:
        folder = self.dir / f"step_{step:010d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"rank{self.d.rank}.pt"
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        self.d.barrier()
        if self.d.main:
            pointer = self.dir / LATEST
            ptmp = self.dir / f"{LATEST}.tmp-{os.getpid()}"
            ptmp.write_text(json.dumps({"step": step, "folder": folder.name, "world_size": self.d.world}))
            os.replace(ptmp, pointer)
            for old in self.dir.glob("step_*"):
                if old.name != folder.name:
                    shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()

    def load(self) -> dict[str, Any] | None:
        info = self.latest()
        if info is None:
            return None
        if int(info.get("world_size", 1)) != self.d.world:
            raise RuntimeError(f"{self.dir}: checkpoint taken with {info.get('world_size')} processes, now "
                               f"{self.d.world}; resume with the same number of processes")
        f = self.dir / info["folder"] / f"rank{self.d.rank}.pt"
        if not f.is_file():
            raise RuntimeError(f"{f}: missing from the checkpoint; delete {self.dir} to restart")
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises several kinds for corrupt pickles
            raise RuntimeError(f"{f}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None

    def remove(self) -> None:
        self.d.barrier()
        if self.d.main:
            shutil.rmtree(self.dir, ignore_errors=True)
