"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per token.

z = (x - b_dec) W_enc + b_enc; of the b * d_sae values ReLU(z) in a batch of b tokens, the k * b
largest are kept, so the *average* L0 is k while single tokens may use more or fewer latents.
Inference cannot see a batch, so a global threshold theta is learned as an exponential moving
average of the smallest kept activation per batch; a checkpoint computes ReLU(z) * [z > theta]
(saved as ``threshold`` broadcast to [d_sae]). AuxK as for TopK.
"""
from __future__ import annotations

import torch

from ..config import SAESpec, TrainConfig
from .base import SAEGroup, StepOutput
from .topk import auxk_loss


class BatchTopKGroup(SAEGroup):
    architecture = "batchtopk"
    apply_b_dec_to_input = True
    uses_coefficient = False
    has_threshold = True

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__(specs, d_in, cfg, b_dec_init)
        self.register_buffer("k", torch.tensor([int(s.sparsity) for s in specs], dtype=torch.int64))
        self.register_buffer("threshold", torch.full((self.n,), -1.0))  # < 0: not estimated yet
        self._min_kept: torch.Tensor | None = None

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        self._last_pre = pre
        b = x.shape[0]
        acts = torch.relu(pre).reshape(self.n, -1)
        kb = self.k * b
        top, idx = acts.topk(min(int(kb.max()), acts.shape[1]), dim=-1)
        keep = torch.arange(top.shape[1], device=x.device) < kb.unsqueeze(1)
        kept = top * keep
        f = torch.zeros_like(acts).scatter(-1, idx, kept).reshape_as(pre)
        with torch.no_grad():
            positive = keep & (top > 0)
            self._min_kept = torch.where(positive, top, torch.full_like(top, float("inf"))).min(dim=1).values
        return f, torch.zeros(self.n, device=x.device)

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return torch.relu(pre) * (pre > self.threshold.clamp_min(0).view(-1, 1, 1))

    def auxiliary_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        return auxk_loss(self, x, pre, recon)

    @torch.no_grad()
    def after_step(self, out: StepOutput, x: torch.Tensor) -> None:
        super().after_step(out, x)
        m = self._min_kept
        if m is not None:
            valid = torch.isfinite(m)
            lr = self.cfg.batchtopk_threshold_lr
            ema = torch.where(self.threshold < 0, m, (1 - lr) * self.threshold + lr * m)
            self.threshold.copy_(torch.where(valid, ema, self.threshold))

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.clamp_min(0).unsqueeze(1).expand(self.n, self.d_sae)
