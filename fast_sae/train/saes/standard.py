"""Standard SAE: ReLU encoder, linear decoder, MSE + L1 (the FAST paper's "Standard", §3.1).

Loss per SAE: ||x - x_hat||^2 + lambda * ||f||_1 with unit-norm decoder rows (renormalised after
every step), as the paper trains it. Option ``l1_decoder_norm`` switches to Anthropic's April
2024 update: the penalty is sum_i f_i * ||W_dec,i|| and the decoder is left free (no renorm),
which makes the penalty invariant to trading encoder scale for decoder scale.
"""
from __future__ import annotations

import torch

from .base import SAEGroup


class StandardGroup(SAEGroup):
    architecture = "standard"
    apply_b_dec_to_input = False

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.pre_activations(x))
        if self.cfg.l1_decoder_norm:
            # sum_i f_i ||W_dec,i|| as a matrix-vector product: no batch x d_sae temporary in the forward
            penalty = torch.bmm(f, self.W_dec.norm(dim=-1).unsqueeze(-1)).squeeze(-1).mean(-1)
        else:
            penalty = f.sum(-1).mean(-1)  # f >= 0, so this is the L1 norm
        return f, penalty

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    @property
    def renormalize_decoder(self) -> bool:
        return not self.cfg.l1_decoder_norm
