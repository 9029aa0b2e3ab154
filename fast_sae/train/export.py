"""Writing one SAE of a stack as an SAELens-style checkpoint (saeio format), folded to raw units."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fast_sae.saeio import save_sae

from .saes import SAEGroup


def save_group(folder: Path, group: SAEGroup, index: int, scale: float, cfg: dict[str, Any]) -> Path:
    """Save SAE ``index`` of ``group``; weights act on raw activations (see SAEGroup.folded_weights)."""
    return save_sae(folder, group.folded_weights(index, scale), cfg)
