"""JumpReLU SAE (Rajamanoharan et al. 2024), with the threshold trained directly (docs/method.md §3).

f = z * H(z - theta) with z = x W_enc + b_enc and a learnable per-feature theta > 0. Loss:
||x - x_hat||^2 + lambda * ||f||_0 with
||f||_0 = sum_i Step(z_i - theta_i). Straight-through estimators with a rectangle kernel of
bandwidth eps:
- JumpReLU: d/dz = H(z - theta); d/dtheta = -(theta/eps) * rect((z - theta)/eps).
- Step: no gradient to z; d/dtheta = -(1/eps) * rect((z - theta)/eps).
So the L0 penalty trains only the thresholds, and the reconstruction trains them through the jump.

Why theta itself and not log theta (the JumpReLU paper's and the FAST paper's SAELens 5.3.3 choice):
Adam moves a parameter by at most about lr per step, so log theta moves theta *multiplicatively*
by ~lr per step; from an init of 0.001 to the pre-activations' scale (~1 with E||x||^2 = d_model)
is ~7 in log units, i.e. ~14,000 steps at lr 5e-4, whatever the L0 coefficient. Measured on the
embedded model's FAST cache (390 steps, d_sae 1,152): coefficients 0.03, 0.3 and 3 all ended at
L0 ~650, also with a 30x learning rate for log theta. Trained directly, theta moves by ~lr per step
in absolute units, so it reaches the pre-activations' scale within a run of ordinary length
(SAELens 6 made the same change, its PR #718; dictionary_learning trains theta directly too).
Positivity, the reason for the log, is kept by projecting theta back onto [MIN_THRESHOLD, inf)
after every step. The bandwidth and init defaults (0.05 / 0.01, SAELens 6's) are for activations
normalised to E||x||^2 = d_model as here; the JumpReLU paper's 0.001 assumed E||x||^2 = 1, i.e.
pre-activations sqrt(d_model) times smaller, and with 0.001 almost no pre-activation falls inside
the kernel, so the threshold gets almost no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import SAESpec, TrainConfig
from .base import SAEGroup, StepOutput

MIN_THRESHOLD = 1e-6


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
        self.threshold = nn.Parameter(torch.full((self.n, self.d_sae), float(cfg.jumprelu_init_threshold)))

    def optim_groups(self) -> list[dict]:
        others = [p for name, p in self.named_parameters() if name != "threshold"]
        return [{"params": others, "lr_scale": 1.0},
                {"params": [self.threshold], "lr_scale": self.cfg.jumprelu_threshold_lr_scale}]

    @torch.no_grad()
    def after_step(self, out: StepOutput, x: torch.Tensor, not_sink: torch.Tensor | None = None) -> None:
        super().after_step(out, x, not_sink)
        self.threshold.clamp_(min=MIN_THRESHOLD)  # the projection that keeps theta > 0

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.pre_activations(x)
        theta = self.threshold.unsqueeze(1)  # [n, 1, d_sae]
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(z, theta, eps)
        l0 = StepFn.apply(z, theta, eps).sum(-1).mean(-1)
        return f, l0

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre_activations(x)
        return torch.relu(z) * (z > self.threshold.unsqueeze(1))

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.detach().clone()
