"""SAE architectures, each a stack of same-shape SAEs trained together (see base.SAEGroup)."""
from __future__ import annotations

from .base import SAEGroup, StepOutput
from .batchtopk import BatchTopKGroup
from .jumprelu import JumpReLUGroup
from .standard import StandardGroup
from .topk import TopKGroup

GROUP_CLASSES: dict[str, type[SAEGroup]] = {
    "standard": StandardGroup,
    "jumprelu": JumpReLUGroup,
    "topk": TopKGroup,
    "batchtopk": BatchTopKGroup,
}

__all__ = ["GROUP_CLASSES", "SAEGroup", "StepOutput", "StandardGroup", "JumpReLUGroup", "TopKGroup",
           "BatchTopKGroup"]
