"""AuxK on the sparse path: the dead latents' reconstruction of the residual, at their cost only.

AuxK (Gao et al. 2024) keeps, per token, the k_aux (= d_in / 2) largest pre-activations among
dead latents and decodes them. k_aux is usually several times k, so on the sparse path it is
where most of the step's entries are; two ways to compute it, chosen per SAE by its dead count D:

- D <= d_sae / 2: dense products over the dead columns only (batch x D x d_in each: the decode,
  its two gradients and the encoder's weight gradient), fast wherever matmuls are fast;
- more dead latents: the kept entries as a sparse pattern (sparse.py), whose cost stays
  batch x k_aux x d_in however many latents are dead.

Each SAE of a stack is handled on its own (its own D), so it computes exactly what it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparse import EncoderAtPattern, SparseDecode, SparsePattern, fixed_k_pattern, top_k_last


class EncoderColumns(torch.autograd.Function):
    """Pre-activations of one SAE at columns ``cols`` ([b, D] values computed without grad), routing
    their gradient to W_enc[:, cols], b_enc[cols] and (through x - b_dec) b_dec."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_in, w_enc, cols)
        ctx.has_b_dec = b_dec is not None
        return values.view_as(values)  # no copy: only the gradient routing is new

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_in, w_enc, cols = ctx.saved_tensors  # [b, d_in], [d_in, d_sae], [D]
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros_like(w_enc).index_copy_(1, cols, x_in.t() @ g)
        grad_b_enc = torch.zeros(w_enc.shape[1], dtype=g.dtype, device=g.device).index_copy_(0, cols, g.sum(0))
        grad_b_dec = -torch.mv(w_enc, grad_b_enc) if ctx.has_b_dec and ctx.needs_input_grad[4] else None
        return None, None, grad_w, grad_b_enc if ctx.needs_input_grad[3] else None, grad_b_dec, None


@dataclass
class DeadColumns:
    cols: torch.Tensor  # [D] dead latents
    pre: torch.Tensor  # [b, D] ReLU(pre-activations) there, no grad
    pos: torch.Tensor  # [b, k] AuxK's choice: positions into cols


@dataclass
class DeadEntries:
    pattern: SparsePattern  # one SAE's [b, d_sae] pattern: k entries per token
    pre: torch.Tensor  # [b * k] ReLU(pre-activations) at them, no grad


AUX_SPARSE_BELOW_DENSITY = 8  # k_aux / n_dead below 1/8: the sparse pattern (see plan)


def plan(acts_i: torch.Tensor, dead_i: torch.Tensor, k_aux: int) -> DeadColumns | DeadEntries | None:
    """AuxK's entries for one SAE from its ReLU(pre-activations) ``acts_i`` [b, d_sae], or the
    pre-activations themselves (TopK: ReLU is applied after the choice), overwritten when many
    latents are dead. Non-positive entries contribute ReLU = 0 and no gradient whether
    chosen or not, so choosing among ReLU'd values gives the dense path's loss and gradients."""
    cols = dead_i.nonzero().squeeze(1)
    n_dead = int(cols.numel())
    if n_dead == 0:
        return None
    k = min(k_aux, n_dead)
    # The dead columns as a dense block (three products of batch x n_dead x d_in) while they are few
    # or the k_aux chosen fill much of them; else the chosen entries as a sparse pattern (products of
    # batch x k_aux x d_in): at d_sae 18,432 with 30% dead, k_aux = 288 of 5,530 columns, the dense
    # block was half of the encoder's forward product again, three times over.
    if 2 * n_dead <= acts_i.shape[1] and k * AUX_SPARSE_BELOW_DENSITY > n_dead:
        pre = acts_i.index_select(1, cols)
        return DeadColumns(cols, pre, pre.topk(k, dim=-1).indices)
    top, idx = top_k_last(acts_i.masked_fill_(~dead_i, float("-inf")), k)
    pattern, order = fixed_k_pattern(idx.unsqueeze(0), acts_i.shape[1])
    return DeadEntries(pattern, (top if order is None else top.gather(-1, order[0])).reshape(-1))


def decode_dead(p: DeadColumns | DeadEntries, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor | None, w_dec: torch.Tensor) -> torch.Tensor:
    """e_hat [b, d_in] of one SAE (parameters of that SAE: w_enc [d_in, d_sae], w_dec [d_sae, d_in])."""
    if isinstance(p, DeadColumns):
        pre = EncoderColumns.apply(p.pre, x_in, w_enc, b_enc, b_dec, p.cols)
        f = torch.zeros_like(pre).scatter(-1, p.pos, torch.relu(pre.gather(-1, p.pos)))
        return f @ w_dec.index_select(0, p.cols)
    pre = EncoderAtPattern.apply(p.pre, x_in, w_enc.unsqueeze(0), b_enc.unsqueeze(0),
                                 None if b_dec is None else b_dec.unsqueeze(0), p.pattern)
    return SparseDecode.apply(torch.relu(pre), w_dec, p.pattern)
