"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per token.

z = (x - b_dec) W_enc + b_enc; of the b * d_sae values ReLU(z) in a batch of b tokens, the k * b
largest are kept, so the *average* L0 is k while single tokens may use more or fewer latents.
Inference cannot see a batch, so a global threshold theta is learned as an exponential moving
average of the smallest kept activation per batch; a checkpoint computes ReLU(z) * [z > theta]
(saved as ``threshold`` broadcast to [d_sae]). AuxK as for TopK. Sparse or dense training step
as for TopK (sparse_group.py).
"""
from __future__ import annotations

import torch

from ..config import SAESpec, TrainConfig
from .base import StepOutput
from .sparse import flat_pattern
from .sparse_group import Kept, SparseTopKFamily
from .topk import auxk_loss


class BatchTopKGroup(SparseTopKFamily):
    architecture = "batchtopk"
    apply_b_dec_to_input = True
    uses_coefficient = False
    has_threshold = True
    threshold: torch.Tensor  # [n] buffer

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__(specs, d_in, cfg, b_dec_init)
        self.register_buffer("threshold", torch.full((self.n,), -1.0))  # < 0: not estimated yet
        self._min_kept: torch.Tensor | None = None

    def _batch_top(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top values of ``acts`` = ReLU(z) [n, b, d_sae] over each SAE's whole batch [n, K], their flat
        indices, keep mask [n, K]); records the smallest kept positive value for the threshold."""
        kb = self.k * acts.shape[1]
        flat = acts.reshape(self.n, -1)
        top, idx = flat.topk(min(int(kb.max()), flat.shape[1]), dim=-1)
        keep = torch.arange(top.shape[1], device=acts.device) < kb.unsqueeze(1)
        with torch.no_grad():
            positive = keep & (top > 0)
            self._min_kept = torch.where(positive, top, torch.full_like(top, float("inf"))).min(dim=1).values
        return top, idx, keep

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        self._last_pre = pre
        top, idx, keep = self._batch_top(torch.relu(pre))
        f = torch.zeros(self.n, pre[0].numel(), dtype=pre.dtype, device=pre.device)
        f = f.scatter(-1, idx, top * keep).reshape_as(pre)
        return f, torch.zeros(self.n, device=x.device)

    def select(self, acts: torch.Tensor) -> Kept:
        """The same batch top-k as the dense step, as a pattern (tokens hold different numbers of entries)."""
        top, idx, keep = self._batch_top(acts)
        pattern, order = flat_pattern(idx, acts.shape[1], self.d_sae)
        mask = None if bool(keep.all()) else keep.to(acts.dtype).reshape(-1)[order]
        return Kept(pattern, top.reshape(-1)[order], mask)

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
