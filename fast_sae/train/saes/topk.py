"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents.

z = (x - b_dec) W_enc + b_enc; f keeps the k largest entries of z per token (then ReLU); no
sparsity penalty, the sparsity is k. AuxK: the k_aux largest pre-activations among *dead*
latents (not fired for ``TrainConfig.dead_window()`` steps) reconstruct the main model's residual error
e = x - x_hat (detached), loss alpha * MSE(e_hat, e) / MSE(mean_batch(e), e) with alpha = 1/32 and
k_aux = d_in / 2, normalised by the batch variance of e as Gao et al.'s code does (and put on the
scale of the unnormalised main loss, sparse_group.auxk_term); it gives dead latents a gradient so
they come back.

SAEs of one stack may have different k: each takes the top max(k) once and masks ranks >= its k.
Training runs on the kept entries only when k / d_sae is small (sparse_group.py), otherwise dense.
"""
from __future__ import annotations

import torch

from .base import SAEGroup
from .sparse import fixed_k_pattern, top_k_last
from .sparse_group import Kept, SparseTopKFamily, auxk_term


def keep_top(values: torch.Tensor, k: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Dense tensor keeping, along the last axis of ``values`` [n, ..., m], the ``k[i]`` largest
    entries (ReLU applied) of stack entry i and zero elsewhere."""
    kmax = int(k.max())
    top, idx = values.topk(min(kmax, dim_size), dim=-1)
    rank = torch.arange(top.shape[-1], device=values.device)
    keep = rank < k.view(-1, *([1] * (values.dim() - 1)))
    return torch.zeros_like(values).scatter(-1, idx, torch.relu(top) * keep)


def auxk_loss(group: SAEGroup, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
    """Dense AuxK: top k_aux of the pre-activations masked to dead latents, decoded with a full matmul."""
    dead = group.dead_mask()  # [n, d_sae], state before this step
    has_dead = dead.any(dim=1)
    if not bool(has_dead.any()):
        return None
    k_aux = min(group.cfg.aux_k or group.d_in // 2, group.d_sae)
    masked = pre.masked_fill(~dead.unsqueeze(1), float("-inf"))
    top, idx = masked.topk(k_aux, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(top))
    return auxk_term(group, torch.bmm(f_aux, group.W_dec), x, recon, has_dead)


class TopKGroup(SparseTopKFamily):
    architecture = "topk"
    apply_b_dec_to_input = True
    uses_coefficient = False
    select_needs_relu = False

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(x)
        self._last_pre = pre
        return keep_top(pre, self.k, self.d_sae), torch.zeros(self.n, device=x.device)

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        return keep_top(self.pre_activations(x), self.k, self.d_sae)

    def auxiliary_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        return auxk_loss(self, x, pre, recon)

    def select(self, acts: torch.Tensor) -> Kept:
        """The same top-k as ``keep_top``, as a pattern: k_max entries per token, ranks >= k masked."""
        n, b, _ = acts.shape
        top, idx = top_k_last(acts, min(int(self.k.max()), self.d_sae))
        pattern, order = fixed_k_pattern(idx, self.d_sae)
        keep = None
        if bool((self.k < top.shape[-1]).any()):
            rank = torch.arange(top.shape[-1], device=acts.device)
            mask = (rank < self.k.view(-1, 1, 1)).to(acts.dtype).expand(n, b, -1)
            keep = (mask if order is None else mask.gather(-1, order)).reshape(-1)
        return Kept(pattern, (top if order is None else top.gather(-1, order)).reshape(-1), keep)
