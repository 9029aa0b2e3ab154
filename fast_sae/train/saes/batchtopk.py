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
from .sparse import TOPK_GROUP, flat_pattern
from .sparse_group import Kept, SparseTopKFamily
from .topk import auxk_loss

CANDIDATES_PER_K = 8  # per-token candidates of the batch top-k, as a multiple of the average kept per token


def batch_top(acts: torch.Tensor, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kb`` largest entries of each stack entry's whole batch ``acts`` [n, b, m] (values >= 0):
    (values [n, kb], indices into the flattened [b * m]) -- what ``acts.reshape(n, -1).topk(kb)`` gives.

    Why not that call: a top-k over one row of b * m values copies the row into value/index pairs
    (3 x the batch's feature matrix) and sorts far more than it keeps. Instead each token offers
    its 8 x kb / b largest values; the batch top-k of those candidates is exact unless a token had
    all its candidates taken with positive values (it may hold more): such tokens offer their
    whole row, and the top-k is taken again over the larger candidate set.
    """
    n, b, m = acts.shape
    kb = min(kb, b * m)
    g = TOPK_GROUP
    if not acts.is_cuda and m % g == 0 and kb * g * 4 <= b * m:
        return _grouped_batch_top(acts, kb, g)
    c = min(m, CANDIDATES_PER_K * -(-kb // b))
    if c == m:
        return acts.reshape(n, -1).topk(kb, dim=-1)
    cand, cand_idx = acts.topk(c, dim=-1)  # [n, b, c]
    cand_flat = cand_idx + (torch.arange(b, device=acts.device) * m).view(1, b, 1)
    top, pos = cand.reshape(n, -1).topk(kb, dim=-1)
    idx = cand_flat.reshape(n, -1).gather(-1, pos)
    last = cand[..., -1]
    full = (last > 0) & (last >= top[:, -1:])  # [n, b]: tokens that may hold more than c of the top
    if not bool(full.any()):
        return top, idx
    tops, idxs = [], []
    for i in range(n):
        if not bool(full[i].any()):
            tops.append(top[i])
            idxs.append(idx[i])
            continue
        rows = full[i].nonzero().squeeze(1)
        part = ~full[i]
        values = torch.cat([cand[i][part].reshape(-1), acts[i][rows].reshape(-1)])
        where = torch.cat([cand_flat[i][part].reshape(-1),
                           (rows.view(-1, 1) * m + torch.arange(m, device=acts.device)).reshape(-1)])
        t, p = values.topk(kb)
        tops.append(t)
        idxs.append(where[p])
    return torch.stack(tops), torch.stack(idxs)


def _grouped_batch_top(acts: torch.Tensor, kb: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_top`` on a CPU, exactly, without per-token top-ks (torch's CPU top-k of a few hundred
    per row costs ~25 ns an entry): each token's m entries form m / g strided groups (entries c,
    c + m/g, ...), whose maxima one vectorised pass takes; the kb largest entries of the batch all lie
    in the kb groups with the largest maxima (an entry outside them is below kb group maxima, so
    below kb entries), so the top-k runs over those kb x g candidates. Entries equal to the kb-th may
    be taken at other positions than a top-k of the whole batch would take (ties are unordered there
    too); the values are the same. Same argument as sparse.top_k_last, over the whole batch."""
    n, b, m = acts.shape
    w = m // g
    gmax = acts.reshape(n, b, g, w).amax(2).reshape(n, b * w)  # group (token t, column c) -> t * w + c
    gsel = gmax.topk(kb, dim=-1, sorted=False).indices  # [n, kb]
    base = (gsel // w) * m + gsel % w  # flat index of each selected group's first entry
    cand_idx = (base.unsqueeze(-1) + torch.arange(g, device=acts.device) * w).reshape(n, kb * g)
    top, pos = acts.reshape(n, b * m).gather(-1, cand_idx).topk(kb, dim=-1)
    return top, cand_idx.gather(-1, pos)


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
        top, idx = batch_top(acts, int(kb.max()))
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
    def after_step(self, out: StepOutput, x: torch.Tensor, not_sink: torch.Tensor | None = None) -> None:
        super().after_step(out, x, not_sink)
        m = self._min_kept
        if m is not None:
            valid = torch.isfinite(m)
            lr = self.cfg.batchtopk_threshold_lr
            ema = torch.where(self.threshold < 0, m, (1 - lr) * self.threshold + lr * m)
            self.threshold.copy_(torch.where(valid, ema, self.threshold))

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.clamp_min(0).unsqueeze(1).expand(self.n, self.d_sae)
