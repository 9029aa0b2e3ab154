"""What every SAE architecture shares: stacked parameters, init, decode, clipping, dead features.

Why stacks: a grid holds many SAEs of the same shape (same layer, width and architecture, different
sparsity settings). Storing them as one ``[n_sae, d_in, d_sae]`` tensor turns n small matmuls into
one batched matmul (``torch.baddbmm``) and one optimiser step, instead of a Python loop over
modules. Every operation is independent along the leading SAE axis (losses are summed, gradient
clipping is per SAE), so an SAE trained in a stack follows the same trajectory as alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import SAESpec, TrainConfig


@dataclass
class StepOutput:
    """Result of one training forward: the scalar to backprop and per-SAE diagnostics ([n] each)."""

    loss: torch.Tensor
    sse: torch.Tensor  # sum over the batch of ||x - x_hat||^2 (normalised units), detached
    err: torch.Tensor  # [n, b] per-token ||x - x_hat||^2, detached (the logged sink-free MSE masks it)
    l0: torch.Tensor  # sum over the batch of active features, detached
    fired: torch.Tensor  # [n, d_sae] bool: fired at least once in this batch


class SAEGroup(nn.Module):
    """``n`` SAEs of one architecture and shape reading the same layer.

    Subclasses implement ``encode_train`` (features plus sparsity term, as in their paper) and
    ``encode_inference`` (what a saved checkpoint computes, see saeio.LoadedSAE.encode).
    """

    architecture = ""
    apply_b_dec_to_input = False
    has_threshold = False
    decoder_path = "dense"  # "sparse" for TopK-family stacks that train on their kept entries only
    # Buffers (registered in __init__), declared for the type checker:
    coefficient: torch.Tensor
    steps_since_fired: torch.Tensor
    acc_sse: torch.Tensor
    acc_l0: torch.Tensor
    acc_sum_x: torch.Tensor
    acc_sum_sq: torch.Tensor
    acc_tokens: torch.Tensor
    acc_sse_kept: torch.Tensor
    acc_tokens_kept: torch.Tensor

    def __init__(self, specs: list[SAESpec], d_in: int, cfg: TrainConfig, b_dec_init: torch.Tensor) -> None:
        super().__init__()
        self.specs = list(specs)
        self.cfg = cfg
        n, d_sae = len(specs), specs[0].d_sae(d_in)
        self.n, self.d_in, self.d_sae = n, d_in, d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        # Same seed for every SAE of a shape: an SAE's init does not depend on what else is in the grid.
        w_dec = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w_dec, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.init_encoder_as_decoder_transpose:
            w_enc = w_dec.t().clone()
        else:
            w_enc = torch.empty(d_in, d_sae)
            nn.init.kaiming_uniform_(w_enc, generator=gen)
        # contiguous [n, d_in, d_sae] (a clone would keep the transposed strides of w_dec.t()): the fused
        # Adam kernel and the gradient sums assume every parameter, gradient and moment is contiguous
        self.W_enc = nn.Parameter(w_enc.expand(n, d_in, d_sae).contiguous())
        self.W_dec = nn.Parameter(w_dec.expand(n, d_sae, d_in).clone())
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae))
        self.b_dec = nn.Parameter(b_dec_init.to(torch.float32).expand(n, d_in).clone())
        self.register_buffer("coefficient", torch.tensor([s.sparsity for s in specs], dtype=torch.float32))
        self.register_buffer("steps_since_fired", torch.zeros(n, d_sae, dtype=torch.int64))
        # Logging window accumulators (kept as buffers so a checkpoint carries them).
        self.register_buffer("acc_sse", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("acc_l0", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("acc_sum_x", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("acc_sum_sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("acc_tokens", torch.zeros((), dtype=torch.int64))
        # The same window without position 0 of each sequence: the attention sink (||x|| ~ 150x the
        # median on SmolLM2) carries nearly all of a batch's squared error, so a curve that includes it
        # shows how the SAE fits a handful of fixed vectors, not whether it has converged.
        self.register_buffer("acc_sse_kept", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("acc_tokens_kept", torch.zeros((), dtype=torch.int64))
        self._last_pre: torch.Tensor | None = None  # pre-activations of the last training forward (AuxK)
        self.dead_window = cfg.dead_window()

    # ------------------------------------------------------------------ shared maths
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """[b, d_in] -> [n, b, d_in]: what each SAE's encoder multiplies."""
        if self.apply_b_dec_to_input:
            return x.unsqueeze(0) - self.b_dec.unsqueeze(1)
        # A materialised copy: bmm on a stride-0 batch takes a slow path in torch's CPU kernels.
        return x.unsqueeze(0) if self.n == 1 else x.unsqueeze(0).expand(self.n, *x.shape).contiguous()

    def pre_activations(self, x: torch.Tensor, xin: torch.Tensor | None = None) -> torch.Tensor:
        """[b, d_in] -> [n, b, d_sae] (``xin``: the encoder input, if already computed)."""
        return torch.baddbmm(self.b_enc.unsqueeze(1), self.encoder_input(x) if xin is None else xin, self.W_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[n, b, d_sae] -> [n, b, d_in]."""
        return torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)

    def encode_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, b, d_sae], per-SAE sparsity penalty [n] averaged over the batch)."""
        raise NotImplementedError

    def encode_inference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward_loss(self, x: torch.Tensor, sparsity_scale: float) -> StepOutput:
        """Loss of every SAE on batch ``x`` [b, d_in]: MSE (summed over d, mean over batch) +
        coefficient * warm-up * sparsity, summed over SAEs (so gradients stay per SAE)."""
        f, sparsity = self.encode_train(x)
        recon = self.decode(f)
        err = (recon - x.unsqueeze(0)).pow(2).sum(-1)  # [n, b]
        mse = err.mean(-1)
        loss = mse + self.coefficient * sparsity_scale * sparsity if self.uses_coefficient else mse
        aux = None if self._last_pre is None else self.auxiliary_loss(x, self._last_pre, recon)
        self._last_pre = None  # [n, b, d_sae]: do not keep it alive while other stacks take their step
        if aux is not None:
            loss = loss + aux
        with torch.no_grad():
            # f >= 0 in every architecture. Not (f > 0).sum(): summing a bool tensor converts it to
            # int64 first, a pass as costly as an elementwise op on 8 x the features' bytes.
            fired = f.amax(dim=1) > 0
            l0 = torch.sign(f).sum(-1).sum(-1, dtype=torch.float64)  # exact: a row counts < 2^24 ones
        err = err.detach()
        return StepOutput(loss=loss.sum(), sse=err.sum(-1).to(torch.float64), err=err, l0=l0, fired=fired)

    uses_coefficient = True

    # ------------------------------------------------------------------ around the optimiser step
    def optim_groups(self) -> list[dict]:
        """Adam parameter groups; ``lr_scale`` multiplies the scheduled learning rate of a group."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The stack's Adam: the fused kernel (one pass over parameter, gradient and both moments per
        tensor, instead of about eight passes of separate operators: on the CPU ~10x faster, a third
        of a TopK step at d_sae 18,432 before), where this torch has it for these tensors."""
        fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and p.is_contiguous()
                    and p.device.type in ("cpu", "cuda") for p in self.parameters())  # (torch 2.13's fused
        # CPU kernel mis-updates a non-contiguous parameter: found here, so it is never given one)
        return torch.optim.Adam(self.optim_groups(), lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                fused=fused or None)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad-norm clipping, per SAE (SAELens clips at 1.0 per SAE). The norms are reduced in
        place (``vector_norm``), not from a squared copy of every gradient."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = torch.zeros(self.n, dtype=torch.float32, device=self.W_enc.device)
        for g in grads:
            sq += torch.linalg.vector_norm(g.reshape(self.n, -1), dim=1).to(torch.float32).square()
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(self.n, *([1] * (g.dim() - 1))))
        return norm

    @property
    def renormalize_decoder(self) -> bool:
        return True

    @torch.no_grad()
    def after_step(self, out: StepOutput, x: torch.Tensor, not_sink: torch.Tensor | None = None) -> None:
        """Unit-norm decoder rows, dead-feature counters and logging accumulators (``not_sink``: [b] bool,
        the rows that are not position 0 of their sequence)."""
        if self.renormalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.steps_since_fired.add_(1).masked_fill_(out.fired, 0)
        self.acc_sse += out.sse
        self.acc_l0 += out.l0
        xd = x.to(torch.float64)
        self.acc_sum_x += xd.sum(0)
        self.acc_sum_sq += torch.dot(xd.reshape(-1), xd.reshape(-1))
        self.acc_tokens += x.shape[0]
        if not_sink is not None:
            self.acc_sse_kept += (out.err * not_sink).sum(-1, dtype=torch.float64)
            self.acc_tokens_kept += int(not_sink.sum())

    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired >= self.dead_window

    @torch.no_grad()
    def take_window_metrics(self) -> list[dict[str, Any]]:
        """Metrics over the steps since the last call, per SAE; resets the window.

        Explained variance is 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2 over the whole window,
        the mean taken over the window's tokens per dimension (docs/method.md §5), not per batch.
        """
        n_tok = max(int(self.acc_tokens), 1)
        n_kept = int(self.acc_tokens_kept)
        centered = float(self.acc_sum_sq) - float(self.acc_sum_x.pow(2).sum()) / n_tok
        dead = self.dead_mask().to(torch.float64).mean(1)
        out = []
        for i in range(self.n):
            sse = float(self.acc_sse[i])
            out.append({"sse": sse, "tokens": n_tok, "mse_normalized": sse / (n_tok * self.d_in),
                        "explained_variance": 1.0 - sse / centered if centered > 0 else float("nan"),
                        "l0": float(self.acc_l0[i]) / n_tok, "dead_fraction": float(dead[i]),
                        "mse_normalized_no_pos0": float(self.acc_sse_kept[i]) / (n_kept * self.d_in)
                        if n_kept else None})
        for buf in (self.acc_sse, self.acc_l0, self.acc_sum_x, self.acc_sum_sq, self.acc_tokens, self.acc_sse_kept,
                    self.acc_tokens_kept):
            buf.zero_()
        return out

    # ------------------------------------------------------------------ export
    def inference_threshold(self) -> torch.Tensor | None:
        """[n, d_sae] threshold tensor saved with the checkpoint, or None."""
        return None

    @torch.no_grad()
    def folded_weights(self, i: int, scale: float) -> dict[str, torch.Tensor]:
        """Weights of SAE ``i`` acting on raw activations (training saw x * scale).

        Pre-activations are unchanged ((s*x - b_dec) @ W_enc == (x - b_dec/s) @ (s*W_enc)), so
        b_enc and thresholds stay; the reconstruction is divided by s.
        """
        w = {"W_enc": self.W_enc[i] * scale, "W_dec": self.W_dec[i] / scale,
             "b_enc": self.b_enc[i].clone(), "b_dec": self.b_dec[i] / scale}
        thr = self.inference_threshold()
        if thr is not None:
            w["threshold"] = thr[i].clone()
        return {k: v.detach().cpu().contiguous() for k, v in w.items()}
