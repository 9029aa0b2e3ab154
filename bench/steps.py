"""One training step of this project's SAEs and of SAELens's, as callables for bench/train.py.

Matched settings: same batch, d_in, d_sae, k, Adam (betas 0.9/0.999), gradient clipping at 1.0,
fp32, same device and threads. Each callable runs the library's own step: ``Trainer._step`` here
(zero_grad, loss, backward, per-SAE clipping, Adam, decoder renorm and dead-feature counters), and
``SAETrainer._train_step`` in SAELens (loss, firing statistics, backward, clipping, Adam, scheduler).
``dead_frac`` marks that fraction of the latents dead in both, so both compute their AuxK term.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast_sae.train.config import SAESpec, TrainConfig  # noqa: E402
from fast_sae.train.saes import GROUP_CLASSES, SAEGroup  # noqa: E402
from fast_sae.train.trainer import Trainer  # noqa: E402

LR = 7e-5


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(arch: str, x: torch.Tensor, d_sae: int, sparsity: float, path: str = "auto", dead_frac: float = 0.0,
         **cfg_kw) -> tuple[Callable[[], None], SAEGroup]:
    d_in = x.shape[1]
    device = str(x.device)
    cfg = TrainConfig(device=device, decoder_path=path, **cfg_kw)
    g = GROUP_CLASSES[arch]([SAESpec(0, arch, d_sae // d_in, sparsity)], d_in, cfg, torch.zeros(d_in)).to(device)
    if dead_frac > 0:
        g.steps_since_fired[:, : int(dead_frac * d_sae)] = 10 ** 9  # a fixed set: never fires -> stays dead
    opt = g.make_optimizer()  # the trainer's Adam (fused where available)

    def step() -> None:
        if dead_frac > 0:
            g.steps_since_fired[:, : int(dead_frac * d_sae)] = 10 ** 9
        Trainer._step(g, opt, x, LR, 1.0)
        _sync(device)

    return step, g


def saelens(arch: str, x: torch.Tensor, d_sae: int, sparsity: float, dead_frac: float = 0.0,
            **sae_kw) -> Callable[[], None]:
    """SAELens 6.x training SAE + its trainer's step. TopK: SAELens defaults (b_dec subtracted from
    the input as here, activations scaled by decoder norms instead of a renormalised decoder).
    Standard: ``sae_kw`` sets what must match this project (see bench/train.py)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = x.shape[1]
    device = str(x.device)
    sae: torch.nn.Module
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=int(sparsity), device=device, **sae_kw))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=sparsity,
                                                            device=device, **sae_kw))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=x.shape[0] * 10 ** 6, lr=LR, lr_end=LR / 10,
                                          train_batch_size_samples=x.shape[0], device=device,
                                          dead_feature_window=1000), sae, iter([]))

    def step() -> None:
        if dead_frac > 0:
            trainer.n_forward_passes_since_fired[: int(dead_frac * d_sae)] = 10 ** 9
        trainer._train_step(sae, x)
        _sync(device)

    return step


def floor(x: torch.Tensor, d_sae: int) -> Callable[[], None]:
    """The step's floor: the encoder's dense forward product alone, x @ W_enc + b_enc into a reused
    [batch, d_sae] buffer (TopK needs this one dense product to choose its entries; the rest of a
    step is sparse)."""
    d_in, device = x.shape[1], str(x.device)
    w = torch.randn(1, d_in, d_sae, device=device) / d_in ** 0.5
    b = torch.zeros(1, 1, d_sae, device=device)
    out = torch.empty(1, x.shape[0], d_sae, device=device)
    xb = x.unsqueeze(0).contiguous()

    def step() -> None:
        torch.baddbmm(b, xb, w, out=out)
        _sync(device)

    return step


def sparsify(x: torch.Tensor, d_sae: int, k: int, dead_frac: float = 0.0) -> Callable[[], None]:
    """EleutherAI sparsify's TopK step (eai-sparsify 1.3.3, bench/setup_sparsify.sh), as its Trainer
    runs it for one SAE with loss_fn fvu: decoder renormalised to unit rows, encoder forward with its
    fused top-k, sparse decode (embedding_bag on CPU), FVU + AuxK (alpha 1/32, its dead mask),
    backward through its fused encoder, the gradient parallel to the decoder rows removed, Adam
    (torch.optim.Adam: bitsandbytes is not installed), zero_grad, and the dead-latent counters."""
    from sparsify import SparseCoder, SparseCoderConfig

    d_in, device = x.shape[1], str(x.device)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    since = torch.zeros(d_sae, dtype=torch.long, device=device)
    n_dead = int(dead_frac * d_sae)
    threshold = 10_000_000  # sparsify's default dead_feature_threshold (tokens)
    auxk_alpha = 1 / 32

    def step() -> None:
        if n_dead:
            since[:n_dead] = 10 ** 12
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since.add_(x.shape[0])
        since[did_fire] = 0
        _sync(device)

    return step


def sparsify_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("eai-sparsify")
    except Exception:
        return None


def saelens_version() -> str:
    try:
        import sae_lens
    except ImportError as exc:
        raise SystemExit(f"sae_lens is not installed ({exc}); pip install sae-lens (CPU torch) to compare") from None
    return str(sae_lens.__version__)


def measure_memory(arch: str, d_in: int, d_sae: int, k: int, path: str, dead_frac: float, batch: int) -> dict:
    """Peak resident memory of 3 steps (above the memory before building the SAE) and the estimate.
    Meant for a fresh process: a small warm-up step first pays the imports and one-time allocations."""
    import gc

    from fast_sae.train.config import SAESpec as Spec
    from fast_sae.train.memory import estimate, measure_peak_rss
    from fast_sae.train.saes.sparse_group import release_workspaces

    x = torch.randn(batch, d_in)
    warm, _ = ours(arch, x[:64], 4 * d_in, 8, path, dead_frac)
    warm()
    warm()
    del warm, _
    release_workspaces()
    gc.collect()

    def run() -> None:
        step, _ = ours(arch, x, d_sae, k, path, dead_frac)
        for _ in range(3):
            step()

    measured = measure_peak_rss(run)
    est = estimate([Spec(0, arch, d_sae // d_in, k)], d_in, 1, TrainConfig(decoder_path=path, batch_tokens=batch))
    return {"measured": measured, "estimate": est.sae_state + est.activations}


if __name__ == "__main__":
    import json

    if len(sys.argv) != 9 or sys.argv[1] != "--memory":
        raise SystemExit("usage: steps.py --memory ARCH D_IN D_SAE K PATH DEAD_FRAC BATCH")
    a = sys.argv[2:]
    print(json.dumps(measure_memory(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], float(a[5]), int(a[6]))))
