"""End-of-run scores on the held-out sequences (or, without any, the last training tokens).

Why here and not only in the evaluate stage: the end-of-run table must say at a glance whether
each SAE of the grid trained (MSE, explained variance, L0, dead features). The evaluate stage
does the full job (paper's per-sequence MSE, special tokens, judge). Explained variance follows
docs/method.md §5: 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2 over the whole scored set, mean taken
per dimension over the set's tokens. MSE is reported on raw activations (per element).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fast_sae.actcache import SPECIAL_ROLES, ActivationCache

from .config import TrainConfig
from .loader import DataSplit, LayerReader
from .saes import SAEGroup


@torch.no_grad()
def evaluate_groups(cache: ActivationCache, split: DataSplit, groups: dict[str, SAEGroup],
                    scales: dict[int, float], cfg: TrainConfig) -> list[dict[str, Any]]:
    lo, hi = split.eval_range
    held_out = hi > lo
    if not held_out:  # nothing held out: score the last training tokens (marked as such)
        lo = max(0, split.train_tokens - cfg.eval_max_tokens)
        hi = split.train_tokens
    hi = min(hi, lo + cfg.eval_max_tokens)
    special = np.isin(cache.roles()[lo:hi], np.array([int(r) for r in SPECIAL_ROLES]))
    rows = []
    layers = sorted({g.specs[0].layer for g in groups.values()})
    for layer in layers:
        x_all = torch.from_numpy(LayerReader(cache, layer, scales[layer]).read(lo, hi)).to(cfg.device)
        mask_all = torch.from_numpy(special).to(cfg.device)
        xd = x_all.to(torch.float64)
        centered = float((xd - xd.mean(0)).pow(2).sum())
        for g in (g for g in groups.values() if g.specs[0].layer == layer):
            g.eval()
            sse = torch.zeros(g.n, dtype=torch.float64, device=cfg.device)
            sse_special = torch.zeros_like(sse)
            l0 = torch.zeros_like(sse)
            fired = torch.zeros(g.n, g.d_sae, dtype=torch.bool, device=cfg.device)
            for start in range(0, len(x_all), cfg.batch_tokens):
                x = x_all[start:start + cfg.batch_tokens]
                f = g.encode_inference(x)
                err = (g.decode(f) - x.unsqueeze(0)).pow(2).sum(-1).to(torch.float64)  # [n, b]
                sse += err.sum(1)
                sse_special += (err * mask_all[start:start + cfg.batch_tokens]).sum(1)
                active = f > 0
                l0 += active.sum(dim=(1, 2)).to(torch.float64)
                fired |= active.any(dim=1)
            g.train()
            n_tok, n_sp = len(x_all), int(special.sum())
            s2 = scales[layer] ** 2
            for i, spec in enumerate(g.specs):
                rows.append({
                    "sae": spec.name, "layer": layer, "architecture": spec.architecture,
                    "d_sae": g.d_sae, "sparsity": spec.sparsity, "eval_tokens": n_tok, "held_out": held_out,
                    "mse": float(sse[i]) / (n_tok * g.d_in) / s2,
                    "mse_special": (float(sse_special[i]) / (n_sp * g.d_in) / s2) if n_sp else None,
                    "explained_variance": 1.0 - float(sse[i]) / centered if centered > 0 else float("nan"),
                    "l0": float(l0[i]) / n_tok,
                    "dead_fraction": float(g.dead_mask()[i].to(torch.float64).mean()),
                    "never_fired_on_eval": float((~fired[i]).to(torch.float64).mean()),
                })
    return rows
