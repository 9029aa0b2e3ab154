"""JumpReLU SAE (Rajamanoharan et al. 2024), exactly as the paper describes it (docs/method.md §3).

f = z * H(z - theta) with z = x W_enc + b_enc and a learnable per-feature theta > 0, stored as
log theta (init log 0.001). Loss: ||x - x_hat||^2 + lambda * ||f||_0 with
||f||_0 = sum_i Step(z_i - theta_i). Straight-through estimators with a rectangle kernel of
bandwidth eps:
- JumpReLU: d/dz = H(z - theta); d/dtheta = -(theta/eps) * rect((z - theta)/eps).
- Step: no gradient to z; d/dtheta = -(1/eps) * rect((z - theta)/eps).
So the L0 penalty trains only the thresholds, and the reconstruction trains them through the jump.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SAESpec, TrainConfig
from .base import SAEGroup


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the threshold's shape (sum over the batch axis)."""
    return grad.sum(dim=1, keepdim=True).reshape(shape)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = g * (z > theta).to(g.dtype)
        gtheta = -(theta / eps) * _rect((z - theta) / eps) * g
        return gz, _sum_to(gtheta, theta.shape), None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, theta = ctx.saved_tensors
        gtheta = -(1.0 / ctx.eps) * _rect((z - theta) / ctx.eps) * g
        return torch.zeros_like(z), _sum_to(gtheta, theta.shape), None


class JumpReLUGroup(SAEGroup):
    architecture = "jumprelu"
    apply_b_dec_to_input = False
    has_threshold = True

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__(specs, d_in, cfg, b_dec_init)
        self.log_threshold = nn.Parameter(torch.full((self.n, self.d_sae), math.log(cfg.jumprelu_init_threshold)))

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.pre_activations(x)
        theta = self.log_threshold.exp().unsqueeze(1)  # [n, 1, d_sae]
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(z, theta, eps)
        l0 = StepFn.apply(z, theta, eps).sum(-1).mean(-1)
        return f, l0

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre_activations(x)
        return torch.relu(z) * (z > self.log_threshold.exp().unsqueeze(1))

    def inference_threshold(self) -> torch.Tensor:
        return self.log_threshold.detach().exp()
