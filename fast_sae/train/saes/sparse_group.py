"""The training step of TopK-family stacks on their kept entries only (the "sparse" decoder path).

Same loss as the dense step of base.SAEGroup (MSE of b_dec + f W_dec, plus AuxK), computed as:
1. the dense encoder product under no_grad (it is what chooses the entries), then the
   architecture's choice of kept entries (``select``) and AuxK's dead-latent entries (``select_aux``);
2. their pre-activations re-enter autograd through ``EncoderAtPattern`` (sparse encoder gradient),
   ReLU (and the rank mask of a stack with different k), and ``SparseDecode`` (sparse decoder).
Nothing of size batch x d_sae outlives step 1, so the step's peak memory is one pre-activation
matrix instead of the dense path's several (memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SAESpec, TrainConfig
from .base import SAEGroup, StepOutput
from .sparse import EncoderAtPattern, SparseDecode, SparsePattern, decoder_path_for, fixed_k_pattern


@dataclass
class Kept:
    """Kept entries of a stack's [n*b, n*d_sae] feature matrix and their pre-activations (no grad)."""

    pattern: SparsePattern
    pre: torch.Tensor  # [nnz], pattern order
    keep: torch.Tensor | None  # [nnz] 1.0 / 0.0, or None when every entry counts


_WORKSPACES: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat scratch tensor of at least ``numel`` elements, shared by every stack of the process
    (stacks take their steps one after another, and nothing keeps a view of it past ``select``)."""
    key = (str(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)
        buf = torch.empty(numel, device=device, dtype=dtype)
        _WORKSPACES[key] = buf
    return buf[:numel]


def release_workspaces() -> None:
    """Free the scratch buffers (they are otherwise kept for the next step)."""
    _WORKSPACES.clear()


def auxk_term(group: SAEGroup, e_hat: torch.Tensor, x: torch.Tensor, recon: torch.Tensor,
              has_dead: torch.Tensor) -> torch.Tensor:
    """AuxK: alpha * ||e - e_hat||^2 (mean over the batch) per SAE, e = x - x_hat detached; 0 without dead latents."""
    e = (x.unsqueeze(0) - recon).detach()
    per_sae = (e_hat - e).pow(2).sum(-1).mean(-1)
    return group.cfg.aux_k_coefficient * per_sae * has_dead.to(per_sae.dtype)


class SparseTopKFamily(SAEGroup):
    """Base of TopK and BatchTopK: picks the decoder path and implements the sparse step."""

    k: torch.Tensor  # [n] buffer: each SAE's k

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__(specs, d_in, cfg, b_dec_init)
        self.register_buffer("k", torch.tensor([int(s.sparsity) for s in specs], dtype=torch.int64))
        self.decoder_path = decoder_path_for(self.architecture, max(int(s.sparsity) for s in specs), self.d_sae,
                                             cfg.decoder_path)

    def select(self, acts: torch.Tensor) -> Kept:
        """The entries the architecture keeps, from ReLU(pre-activations) [n, b, d_sae].

        ReLU first changes nothing that matters: an entry whose pre-activation is <= 0 contributes
        ReLU = 0 and no gradient whether or not it is picked, and positive entries keep their ranks.
        """
        raise NotImplementedError

    def k_aux(self) -> int:
        return min(self.cfg.aux_k or self.d_in // 2, self.d_sae)

    def select_aux(self, acts: torch.Tensor) -> Kept | None:
        """AuxK's entries: per token, the k_aux largest of ReLU(pre) among dead latents (None if none is dead).

        Overwrites ``acts`` (no longer needed). With few dead latents only their columns are gathered
        (padded with -inf to the stack's largest dead count), so the top-k runs over batch x n_dead
        values; with many, live columns are set to -inf in place. A padded, live or non-positive
        entry contributes ReLU = 0 and no gradient, as in the dense path.
        """
        dead = self.dead_mask()
        counts = dead.sum(1)
        d_max = int(counts.max())
        if d_max == 0:
            return None
        n, b, m = acts.shape
        k = min(self.k_aux(), d_max)
        if 2 * d_max > m:
            top, feats = acts.masked_fill_(~dead.unsqueeze(1), float("-inf")).topk(k, dim=-1)
        else:
            cols = torch.argsort((~dead).to(torch.int8), dim=1, stable=True)[:, :d_max]  # dead latents first
            cand = acts.gather(-1, cols.unsqueeze(1).expand(n, b, d_max))
            cand.masked_fill_((torch.arange(d_max, device=acts.device) >= counts.unsqueeze(1)).unsqueeze(1),
                              float("-inf"))
            top, pos = cand.topk(k, dim=-1)
            del cand
            feats = cols.unsqueeze(1).expand(n, b, d_max).gather(-1, pos)
        pattern, order = fixed_k_pattern(feats, m)
        return Kept(pattern, (top if order is None else top.gather(-1, order)).reshape(-1), None)

    def forward_loss(self, x: torch.Tensor, sparsity_scale: float) -> StepOutput:
        if self.decoder_path != "sparse":
            return super().forward_loss(x, sparsity_scale)
        n, b, m, d = self.n, x.shape[0], self.d_sae, self.d_in
        with torch.no_grad():
            xin = self.encoder_input(x)
            # The only batch x d_sae matrix of the step, in a buffer reused from step to step: a fresh
            # one costs as much in page faults as its ReLU and top-k together on a CPU.
            acts = _workspace(n * b * m, x.device, x.dtype).view(n, b, m)
            torch.baddbmm(self.b_enc.unsqueeze(1), xin, self.W_enc, out=acts)
            acts.relu_()
            kept = self.select(acts)
            aux = self.select_aux(acts)
            del acts
        xin2 = xin.reshape(n * b, d)
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        table = self.W_dec.reshape(n * m, d)
        pre_kept = EncoderAtPattern.apply(kept.pre, xin2, self.W_enc, self.b_enc, b_dec, kept.pattern)
        acts = torch.relu(pre_kept) if kept.keep is None else torch.relu(pre_kept) * kept.keep
        recon = SparseDecode.apply(acts, table, kept.pattern).view(n, b, d) + self.b_dec.unsqueeze(1)
        err = (recon - x.unsqueeze(0)).pow(2).sum(-1)  # [n, b]
        loss = err.mean(-1)
        if aux is not None:
            pre_aux = EncoderAtPattern.apply(aux.pre, xin2, self.W_enc, self.b_enc, b_dec, aux.pattern)
            e_hat = SparseDecode.apply(torch.relu(pre_aux), table, aux.pattern).view(n, b, d)
            loss = loss + auxk_term(self, e_hat, x, recon, self.dead_mask().any(dim=1))
        with torch.no_grad():
            active = acts.detach() > 0
            l0 = active.view(n, -1).sum(1).to(torch.float64)
            fired = torch.zeros(n * m, dtype=torch.bool, device=x.device)
            fired[kept.pattern.col[active]] = True
        return StepOutput(loss=loss.sum(), sse=err.detach().sum(-1).to(torch.float64), l0=l0,
                          fired=fired.view(n, m))
