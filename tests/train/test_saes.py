"""Each architecture learns a known sparse dictionary; the loss pieces follow their papers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fast_sae.saeio import load_sae
from fast_sae.train.config import GridConfig, SAESpec, TrainConfig
from fast_sae.train.saes import GROUP_CLASSES
from fast_sae.train.saes.jumprelu import JumpReLUFn, StepFn
from fast_sae.train.saes.topk import keep_top
from fast_sae.train.trainer import Trainer


def mean_max_cosine(dictionary: np.ndarray, w_dec: np.ndarray) -> float:
    w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return float((dictionary @ w.T).max(axis=1).mean())


@pytest.mark.slow
def test_every_architecture_recovers_a_synthetic_dictionary(synthetic_cache, tmp_path):
    cache, dictionary = synthetic_cache
    cfg = TrainConfig(tokens=256_000, batch_tokens=256, lr=3e-3, lr_end=3e-4, eval_sequences=20, buffer_tokens=8192,
                      log_every=250, dead_window_steps=100)
    grid = GridConfig(layers=[0], architectures=["standard", "jumprelu", "topk", "batchtopk"], expansion_factors=[2],
                      l1_coefficients=[0.3], l0_coefficients=[1.0], k=[3])
    result = Trainer(cache, tmp_path / "run", cfg, grid, echo=lambda s: None, progress=False).run()
    assert result.status == "finished"
    rows = {r["sae"]: r for r in result.rows}
    for spec in grid.specs():
        sae = load_sae(tmp_path / "run" / spec.name)
        mmcs = mean_max_cosine(dictionary, sae.W_dec.numpy())
        assert mmcs > 0.9, (spec.name, mmcs)
        assert rows[spec.name]["explained_variance"] > 0.9, rows[spec.name]
        assert rows[spec.name]["held_out"]
    # The sparsity constraint binds: ground truth has 2.56 active features per token.
    assert rows["L0_topk_x2_k3"]["l0"] == pytest.approx(3.0)
    assert 2.0 < rows["L0_batchtopk_x2_k3"]["l0"] < 4.0
    assert 2.0 < rows["L0_jumprelu_x2_l0_1"]["l0"] < 3.5  # the L0 coefficient finds the true sparsity


def _group(arch: str, sparsity: list[float], d_in: int = 8, ef: int = 2, **kw):
    cfg = TrainConfig(**kw)
    specs = [SAESpec(0, arch, ef, s) for s in sparsity]
    return GROUP_CLASSES[arch](specs, d_in, cfg, torch.zeros(d_in))


def test_jumprelu_straight_through_gradients_match_the_paper():
    eps = 0.1
    z = torch.tensor([[[0.20, 0.26, 0.5, -1.0]]], requires_grad=True)
    theta = torch.tensor([[[0.25, 0.25, 0.25, 0.25]]], requires_grad=True)
    JumpReLUFn.apply(z, theta, eps).sum().backward()
    # d/dz = H(z - theta); d/dtheta = -(theta/eps) rect((z - theta)/eps)
    assert z.grad.tolist() == [[[0.0, 1.0, 1.0, 0.0]]]
    assert theta.grad[0, 0, :2].tolist() == pytest.approx([-2.5, -2.5])
    assert theta.grad[0, 0, 2:].tolist() == [0.0, 0.0]
    z.grad = None
    theta.grad = None
    StepFn.apply(z, theta, eps).sum().backward()
    assert z.grad.abs().sum() == 0  # the L0 term trains only the thresholds
    assert theta.grad[0, 0].tolist() == pytest.approx([-10.0, -10.0, 0.0, 0.0])


def test_jumprelu_thresholds_start_at_init_are_saved_as_is_and_stay_positive():
    g = _group("jumprelu", [0.01], jumprelu_init_threshold=0.001)
    assert torch.equal(g.threshold, torch.full((1, 16), 0.001)) and torch.equal(g.inference_threshold(), g.threshold)
    opt = torch.optim.Adam(g.optim_groups(), lr=0.01)
    with torch.no_grad():
        g.threshold[0, :4] = -0.5  # as an overshooting step could leave it
    Trainer._step(g, opt, torch.randn(32, 8), 0.01, 1.0)
    assert float(g.threshold.detach().min()) > 0


def test_topk_keeps_k_per_sae_of_a_stack():
    values = torch.randn(3, 5, 10)
    k = torch.tensor([1, 3, 10])
    f = keep_top(values, k, 10)
    counts = (f != 0).sum(-1)
    assert (counts[0] <= 1).all() and (counts[1] <= 3).all()
    assert torch.equal(f[2], torch.relu(values[2]))
    top1 = values[0].max(-1).values.clamp_min(0)
    assert torch.allclose(f[0].sum(-1), top1)


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    g = _group("batchtopk", [2, 4], batchtopk_threshold_lr=0.5)
    x = torch.randn(32, 8)
    out = g.forward_loss(x, 1.0)
    assert out.l0.tolist() == [64.0, 128.0]  # k * batch active values in the whole batch
    assert (g.threshold < 0).all()
    g.after_step(out, x)
    assert (g.threshold > 0).all()  # first estimate = smallest kept activation


def test_standard_loss_is_mse_plus_l1_and_the_decoder_norm_variant_weights_it():
    g = _group("standard", [5.0])
    x = torch.randn(4, 8)
    with torch.no_grad():
        g.W_dec.mul_(2.0)
    out = g.forward_loss(x, 0.5)
    f = torch.relu(x @ g.W_enc[0] + g.b_enc[0])
    recon = f @ g.W_dec[0] + g.b_dec[0]
    expected = (recon - x).pow(2).sum(-1).mean() + 5.0 * 0.5 * f.sum(-1).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    g2 = _group("standard", [5.0], l1_decoder_norm=True)
    with torch.no_grad():
        g2.W_dec.mul_(2.0)
    out2 = g2.forward_loss(x, 1.0)
    expected2 = (recon - x).pow(2).sum(-1).mean() + 5.0 * (2.0 * f).sum(-1).mean()
    assert torch.allclose(out2.loss, expected2, rtol=1e-5)
    assert not g2.renormalize_decoder and g.renormalize_decoder


def test_gradient_clipping_is_per_sae():
    g = _group("standard", [1.0, 1.0])
    for p in g.parameters():
        p.grad = torch.zeros_like(p)
    g.W_enc.grad[0].fill_(10.0)
    g.W_enc.grad[1].fill_(1e-4)
    norms = g.clip_grad_norm_(1.0)
    assert norms[0] > 1 and norms[1] < 1
    assert g.W_enc.grad[0].norm() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(g.W_enc.grad[1], torch.full_like(g.W_enc.grad[1], 1e-4))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk"])
def test_decoder_init_is_unit_norm_encoder_transpose(arch):
    g = _group(arch, [3])
    assert torch.allclose(g.W_dec.norm(dim=-1), torch.ones(1, 16))
    assert torch.equal(g.W_enc[0], g.W_dec[0].t())


def test_dead_window_is_relative_to_the_run():
    """Gao et al.'s 10M tokens, capped at a tenth of the run, so AuxK acts in short runs too."""
    assert TrainConfig(tokens=390 * 1024, batch_tokens=1024).dead_window() == 39
    assert TrainConfig(tokens=40_960_000, batch_tokens=4096).dead_window() == 1000
    assert TrainConfig(tokens=4_096_000_000, batch_tokens=4096).dead_window() == 2442  # 10M tokens
    assert TrainConfig(tokens=390 * 1024, batch_tokens=1024, dead_window_steps=7).dead_window() == 7


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_acts_when_latents_die_in_a_short_run(arch):
    """Latents that never make the top k get a gradient only through AuxK; in a 40-step run they are
    declared dead after 4 steps and AuxK moves their encoder columns. With the old fixed 1,000-step
    window they never count as dead and stay where they started."""
    torch.manual_seed(0)
    x = torch.randn(256, 8) * 3

    def train(**kw) -> tuple[torch.Tensor, torch.Tensor]:
        g = _group(arch, [2], d_in=8, ef=4, tokens=40 * 256, batch_tokens=256, decoder_path="dense", **kw)
        with torch.no_grad():
            g.W_enc[0, :, :8] *= 1e-3  # positive but tiny pre-activations: never among the top 2
        start = g.W_enc[0, :, :8].detach().clone()
        opt = torch.optim.Adam(g.optim_groups(), lr=1e-3)
        for _ in range(40):
            Trainer._step(g, opt, x, 1e-3, 1.0)
        return start, g.W_enc[0, :, :8].detach()

    start, end = train()
    assert not torch.allclose(start, end)
    start, end = train(dead_window_steps=1000)
    assert torch.equal(start, end)


def test_jumprelu_l0_responds_to_its_coefficient_in_a_short_run():
    """200 steps: the L0 coefficient sets the L0 (with log-thresholds and the paper's bandwidth every
    coefficient ended at the same L0 in a run of this length)."""
    torch.manual_seed(0)
    x = torch.randn(512, 32)  # E||x||^2 = d_model, as the trainer normalises
    g = _group("jumprelu", [0.001, 0.1, 10.0], d_in=32, ef=4)
    opt = torch.optim.Adam(g.optim_groups(), lr=1e-3)
    for _ in range(200):
        Trainer._step(g, opt, x, 1e-3, 1.0)
    with torch.no_grad():
        l0 = (g.encode_inference(x) > 0).float().sum(-1).mean(-1)
    assert l0[0] > 1.5 * l0[1] > 1.5 * 1.5 * l0[2], l0.tolist()
