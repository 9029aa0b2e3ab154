"""Learning-rate and sparsity-coefficient schedules (docs/method.md §3, SAELens 5.3.3 semantics).

Why plain functions of the step: the trainer sets the lr of every param group from them each
step, so a resumed run needs no scheduler state to be bit-exact.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, cosine from lr to lr_end, then a linear tail from lr_end to 0."""
    warm = int(cfg.warmup_frac * total_steps)
    decay = int(cfg.decay_frac * total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= total_steps - decay:
        return cfg.lr_end * (total_steps - step) / max(decay, 1)
    t_max = max(total_steps - warm - decay, 1)
    progress = (step - warm) / t_max
    return cfg.lr_end + (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * progress)) / 2


def sparsity_scale_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Sparsity-coefficient warm-up: coefficient * (step + 1) / warm-up steps, then constant."""
    warm = int(cfg.sparsity_warmup_frac * total_steps)
    if warm <= 0:
        return 1.0
    return min(1.0, (step + 1) / warm)
