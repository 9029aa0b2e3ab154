"""The training step of TopK-family stacks on their kept entries only (the "sparse" decoder path).

Same loss as the dense step of base.SAEGroup (MSE of b_dec + f W_dec, plus AuxK), computed as:
1. the dense encoder product under no_grad (it is what chooses the entries), then the
   architecture's choice of kept entries (``select``) and AuxK's dead-latent entries (auxk.py);
2. their pre-activations re-enter autograd through ``EncoderAtPattern`` (sparse encoder gradient),
   ReLU (and the rank mask of a stack with different k), and ``SparseDecode`` (sparse decoder);
   AuxK's through auxk.decode_dead.
Nothing of size batch x d_sae outlives step 1 (AuxK keeps at most batch x d_sae / 2 values of
its dead columns), so the step's peak memory is about one pre-activation matrix plus AuxK's
instead of the dense path's six to nine (memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SAESpec, TrainConfig
from . import auxk
from .base import SAEGroup, StepOutput
from .sparse import EncoderAtPattern, SparseDecode, SparsePattern, decoder_path_for


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
    """AuxK per SAE with Gao et al.'s normalisation, on the scale of this project's main loss:
    alpha * [MSE(e_hat, e) / MSE(mean_batch(e), e)] * mean_batch ||x - mean_batch(x)||^2, with
    e = x - x_hat detached; 0 without dead latents.

    Why: Gao et al. divide both their losses by the batch variance of the target (the main loss by
    x's, AuxK by e's), so AuxK's pull does not fade as the residual e shrinks and alpha = 1/32 is
    scale-free. Our main loss is the unnormalised ||x - x_hat||^2; multiplying their normalised
    AuxK by x's batch variance keeps exactly their ratio between the two terms.
    """
    e = (x.unsqueeze(0) - recon).detach()
    num = (e_hat - e).pow(2).mean((-2, -1))
    den = (e - e.mean(-2, keepdim=True)).pow(2).mean((-2, -1))
    x_var = (x - x.mean(0)).pow(2).sum(-1).mean().detach()
    per_sae = torch.nan_to_num(num / den.clamp_min(torch.finfo(den.dtype).tiny)) * x_var
    return group.cfg.aux_k_coefficient * per_sae * has_dead.to(per_sae.dtype)


class SparseTopKFamily(SAEGroup):
    """Base of TopK and BatchTopK: picks the decoder path and implements the sparse step."""

    k: torch.Tensor  # [n] buffer: each SAE's k
    # Whether ``select`` must see ReLU(pre-activations). TopK's does not: ReLU is monotone, so the k
    # largest pre-activations are the k largest ReLU'd ones (entries <= 0 among them give ReLU = 0 and
    # no gradient either way, applied after the choice), and AuxK's choice among dead latents is the
    # same; skipping it saves a pass over the batch x d_sae matrix.
    select_needs_relu = True

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__(specs, d_in, cfg, b_dec_init)
        self.register_buffer("k", torch.tensor([int(s.sparsity) for s in specs], dtype=torch.int64))
        self.decoder_path = decoder_path_for(self.architecture, max(int(s.sparsity) for s in specs), self.d_sae,
                                             cfg.decoder_path)

    def select(self, acts: torch.Tensor) -> Kept:
        """The entries the architecture keeps, from ReLU(pre-activations) [n, b, d_sae] (or the
        pre-activations themselves where ``select_needs_relu`` is False).

        ReLU first changes nothing that matters: an entry whose pre-activation is <= 0 contributes
        ReLU = 0 and no gradient whether or not it is picked, and positive entries keep their ranks.
        """
        raise NotImplementedError

    def k_aux(self) -> int:
        return min(self.cfg.aux_k or self.d_in // 2, self.d_sae)

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
            if self.select_needs_relu:
                acts.relu_()
            kept = self.select(acts)
            dead = self.dead_mask()  # state before this step
            has_dead = dead.any(dim=1)
            aux = [auxk.plan(acts[i], dead[i], self.k_aux()) for i in range(n)] if bool(has_dead.any()) else None
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
            e_hat = torch.stack([
                torch.zeros(b, d, dtype=x.dtype, device=x.device) if p is None else
                auxk.decode_dead(p, xin[i], self.W_enc[i], self.b_enc[i], None if b_dec is None else b_dec[i],
                                 self.W_dec[i])
                for i, p in enumerate(aux)])
            loss = loss + auxk_term(self, e_hat, x, recon, has_dead)
        with torch.no_grad():
            active = acts.detach() > 0
            l0 = active.view(n, -1).sum(1).to(torch.float64)
            fired = torch.zeros(n * m, dtype=torch.bool, device=x.device)
            fired[kept.pattern.col[active]] = True
        err = err.detach()
        return StepOutput(loss=loss.sum(), sse=err.sum(-1).to(torch.float64), err=err, l0=l0, fired=fired.view(n, m))
