"""Saving and loading SAE checkpoints, and their inference-time encode/decode.

Why inference lives here and not in train/: evaluation (and any user) must be able to run a
checkpoint with nothing but this package; training code may change, the format may not.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .architectures import COMMON_TENSORS, Architecture, get_architecture
from .errors import CheckpointError
from .layout import from_cfg_json, to_cfg_json
from .schema import CheckpointConfig

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"


def as_config(cfg: CheckpointConfig | Mapping[str, Any], where: str) -> CheckpointConfig:
    """A CheckpointConfig as is; a mapping read exactly as a cfg.json with that content would be."""
    return cfg if isinstance(cfg, CheckpointConfig) else from_cfg_json(cfg, where)


def save_sae(folder: str | Path, weights: dict[str, torch.Tensor],
             cfg: CheckpointConfig | Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically: a reader sees the old folder or the whole new one, never half.

    Weights are stored as float32 exactly as given (the caller folds any normalisation first).
    """
    folder = Path(folder)
    config = as_config(cfg, f"cfg for {folder}")
    doc = to_cfg_json(config, f"cfg for {folder}")
    check_weights(weights, config, get_architecture(config.architecture), f"weights for {folder}")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
              str(tmp / SAE_WEIGHTS))
    (tmp / SAE_CFG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def check_weights(weights: Mapping[str, torch.Tensor], cfg: CheckpointConfig, arch: Architecture,
                  where: str) -> None:
    """Exactly the tensors the architecture needs, each of the shape cfg says."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              **{name: (d_sae,) for name in arch.tensors}}
    for name, shape in shapes.items():
        if name not in weights:
            raise CheckpointError(f"{where}: tensor {name!r} missing ({cfg.architecture} needs "
                                  f"{', '.join(shapes)})")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} for a {cfg.architecture} SAE")


class LoadedSAE(torch.nn.Module):
    """A checkpoint ready for inference on raw residual activations of shape [..., d_in]."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: CheckpointConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.arch = get_architecture(cfg.architecture)
        self.architecture: str = cfg.architecture
        self.W_enc = torch.nn.Parameter(weights["W_enc"], requires_grad=False)
        self.W_dec = torch.nn.Parameter(weights["W_dec"], requires_grad=False)
        self.b_enc = torch.nn.Parameter(weights["b_enc"], requires_grad=False)
        self.b_dec = torch.nn.Parameter(weights["b_dec"], requires_grad=False)
        threshold = weights.get("threshold")
        self.threshold = None if threshold is None else torch.nn.Parameter(threshold, requires_grad=False)
        self.k = cfg.k
        self.apply_b_dec_to_input = cfg.apply_b_dec_to_input

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def layer(self) -> int:
        """The cache layer (decoder block output) this SAE reads."""
        return self.cfg.layer

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors as a checkpoint stores them."""
        out = {"W_enc": self.W_enc.data, "W_dec": self.W_dec.data, "b_enc": self.b_enc.data, "b_dec": self.b_dec.data}
        if self.threshold is not None:
            out["threshold"] = self.threshold.data
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        return self.arch.activate(pre, self.threshold, self.k)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def sae_from_parts(weights: dict[str, torch.Tensor], cfg: CheckpointConfig, where: str) -> LoadedSAE:
    """A LoadedSAE from tensors in any supported form (another tool's included) and their config."""
    arch = get_architecture(cfg.architecture, where)
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    scaling = weights.pop("scaling_factor", None)  # SAELens <= 5 wrote it; all ones unless fine-tuned
    if scaling is not None and not torch.all(scaling == 1):
        raise CheckpointError(f"{where}: tensor 'scaling_factor' is not all ones (a fine-tuned scaling is not "
                              f"supported here)")
    cfg = arch.prepare(weights, cfg)
    check_weights(weights, cfg, arch, where)
    return LoadedSAE({k: weights[k] for k in (*COMMON_TENSORS, *arch.tensors)}, cfg)


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """Load a checkpoint folder written by this project or by SAELens (6.x or pre-6.0 layout)."""
    folder = Path(folder)
    cfg_file, weights_file = folder / SAE_CFG, folder / SAE_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; {folder} is not an SAE checkpoint")
    try:
        doc = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({exc})") from None
    cfg = from_cfg_json(doc, str(cfg_file))
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_file}: unreadable safetensors ({exc})") from None
    return sae_from_parts(weights, cfg, str(weights_file)).to(device)
