"""Saving and loading SAE checkpoints, and their inference-time encode/decode.

Why inference lives here and not in train/: evaluation (and any user) must be able to run a
checkpoint with nothing but this file; training code may change, the format may not.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")
REQUIRED_CFG = ("architecture", "d_in", "d_sae", "hook_name", "hook_layer")


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; one line naming the file and field."""


def save_sae(folder: str | Path, weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: a reader sees the old folder or the whole new one, never half."""
    folder = Path(folder)
    for key in REQUIRED_CFG:
        if key not in cfg:
            raise CheckpointError(f"cfg for {folder}: missing field {key!r}")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
              str(tmp / SAE_WEIGHTS))
    (tmp / SAE_CFG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


class LoadedSAE(torch.nn.Module):
    """A checkpoint ready for inference on raw residual activations of shape [..., d_in]."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.architecture: str = cfg["architecture"]
        self.W_enc = torch.nn.Parameter(weights["W_enc"], requires_grad=False)
        self.W_dec = torch.nn.Parameter(weights["W_dec"], requires_grad=False)
        self.b_enc = torch.nn.Parameter(weights["b_enc"], requires_grad=False)
        self.b_dec = torch.nn.Parameter(weights["b_dec"], requires_grad=False)
        threshold = weights.get("threshold")
        self.threshold = None if threshold is None else torch.nn.Parameter(threshold, requires_grad=False)
        self.k = cfg.get("k")
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", False))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture in ("jumprelu", "batchtopk") and self.threshold is not None:
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture in ("topk", "batchtopk"):
            k = int(self.k)
            values, indices = torch.topk(pre, k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        raise CheckpointError(f"architecture {self.architecture!r} needs a threshold tensor")

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    folder = Path(folder)
    cfg_file, weights_file = folder / SAE_CFG, folder / SAE_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; {folder} is not an SAE checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({exc})") from None
    for key in REQUIRED_CFG:
        if key not in cfg:
            raise CheckpointError(f"{cfg_file}: missing field {key!r}")
    if cfg["architecture"] not in ARCHITECTURES:
        raise CheckpointError(f"{cfg_file}: architecture {cfg['architecture']!r}, expected one of {ARCHITECTURES}")
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_file}: unreadable safetensors ({exc})") from None
    for key in ("d_in", "d_sae"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise CheckpointError(f"{cfg_file}: field {key!r} must be a positive integer, got {cfg[key]!r}")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in weights:
            raise CheckpointError(f"{weights_file}: tensor {name!r} missing")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{weights_file}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    if cfg["architecture"] in ("topk",) and not cfg.get("k"):
        raise CheckpointError(f"{cfg_file}: topk checkpoint without field 'k'")
    return LoadedSAE(weights, cfg).to(device)
