"""Writing one SAE of a stack as an SAELens-style checkpoint (saeio format), folded to raw units."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from fast_sae.saeio import CheckpointError, save_sae

from .runfiles import remove_stale_temps
from .saes import SAEGroup


def save_group(folder: Path, group: SAEGroup, index: int, scale: float, cfg: dict[str, Any]) -> Path:
    """Save SAE ``index`` of ``group``; weights act on raw activations (see SAEGroup.folded_weights).

    save_sae writes ``<sae>.tmp-<pid>/`` then renames it: those of killed runs are removed first, and
    this run's own is removed when the write fails (a full disk must not stay full of it)."""
    remove_stale_temps(folder.parent, prefix=folder.name + ".")
    try:
        return save_sae(folder, group.folded_weights(index, scale), cfg)
    except OSError as exc:
        shutil.rmtree(folder.with_name(f"{folder.name}.tmp-{os.getpid()}"), ignore_errors=True)
        raise CheckpointError(f"{folder}: cannot write the SAE ({exc.strerror or exc}); free space and rerun "
                              f"(the run resumes from its last checkpoint)") from None
