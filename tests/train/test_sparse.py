"""The sparse TopK-family step: its products, and the same losses, gradients and weights as the dense step."""
from __future__ import annotations

import pytest
import torch

from fast_sae.train.config import ConfigError, GridConfig, SAESpec, TrainConfig
from fast_sae.train.saes import GROUP_CLASSES
from fast_sae.train.saes.sparse import EncoderAtPattern, SparseDecode, fixed_k_pattern, flat_pattern
from fast_sae.train.trainer import Trainer


def _dense_matrix(pattern, values: torch.Tensor) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(pattern.n_rows), pattern.offsets.diff())
    out = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=values.dtype)
    out[rows, pattern.col] = values
    return out


def _patterns(n: int, b: int, m: int) -> list:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(n, b, m, generator=gen, dtype=torch.float64)
    _, idx = pre.topk(3, dim=-1)
    fixed, _ = fixed_k_pattern(idx, m)
    _, flat_idx = pre.reshape(n, -1).topk(2 * b, dim=-1)  # BatchTopK-like: tokens hold 0..m entries
    flat, _ = flat_pattern(flat_idx, b, m)
    return [fixed, flat]


@pytest.mark.parametrize("which", [0, 1], ids=["per-token", "per-batch"])
def test_sparse_decode_is_the_dense_product_with_its_gradients(which):
    n, b, m, d = 2, 5, 7, 3
    p = _patterns(n, b, m)[which]
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(p.nnz, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(n * m, d, generator=gen, dtype=torch.float64, requires_grad=True)
    out = SparseDecode.apply(values, table, p)
    assert torch.allclose(out, _dense_matrix(p, values.detach()) @ table.detach())
    assert torch.autograd.gradcheck(lambda v, t: SparseDecode.apply(v, t, p), (values, table))
    # Block-diagonal: stack entry 0's rows only read stack entry 0's table rows.
    assert (_dense_matrix(p, torch.ones(p.nnz, dtype=torch.float64))[:b, m:] == 0).all()


@pytest.mark.parametrize("which", [0, 1], ids=["per-token", "per-batch"])
def test_encoder_at_pattern_routes_the_gradient_of_the_dense_pre_activations(which):
    n, b, m, d = 2, 5, 7, 3
    p = _patterns(n, b, m)[which]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    params = [torch.randn(n, d, m, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(n, m, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)]
    rows = torch.repeat_interleave(torch.arange(n * b), p.offsets.diff())
    flat = rows * m + p.col % m  # entry -> index into [n*b*m]
    g = torch.randn(p.nnz, generator=gen, dtype=torch.float64)

    def pre(w, be, bd):
        xin = x.unsqueeze(0) - bd.unsqueeze(1)
        return xin, torch.baddbmm(be.unsqueeze(1), xin, w)

    def dense(w, be, bd):
        return pre(w, be, bd)[1].reshape(-1)[flat]

    def sparse(w, be, bd):
        with torch.no_grad():
            xin, z = pre(w, be, bd)
        return EncoderAtPattern.apply(z.reshape(-1)[flat], xin.reshape(n * b, d), w, be, bd, p)

    assert torch.equal(sparse(*params), dense(*params))
    for a, e in zip(torch.autograd.grad(sparse(*params), params, g), torch.autograd.grad(dense(*params), params, g)):
        assert torch.allclose(a, e)


# ---------------------------------------------------------------------------------------------- whole steps
D_IN, EF = 16, 4  # d_sae 64
# Dead latents per SAE of a 2-stack at the start, so AuxK runs from the first step: few (AuxK on the
# dead columns, auxk.py), many (> d_sae / 2: AuxK's entries as a sparse pattern), one of each.
DEAD = {"few": (24, 24), "many": (48, 40), "mixed": (10, 50)}


def _pair(arch: str, ks: list[int], dead_window_steps: int = 50, dead: tuple[int, int] = DEAD["mixed"]):
    out = []
    for path in ("sparse", "dense"):
        cfg = TrainConfig(decoder_path=path, dead_window_steps=dead_window_steps)
        g = GROUP_CLASSES[arch]([SAESpec(0, arch, EF, k) for k in ks], D_IN, cfg, torch.zeros(D_IN) + 0.1)
        for i, n_dead in enumerate(dead):
            g.steps_since_fired[i, :n_dead] = 1000
        out.append(g)
    assert out[0].decoder_path == "sparse" and out[1].decoder_path == "dense"
    return out


def _batches(n_steps: int, b: int = 48) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(40, D_IN, generator=gen)
    return [(torch.rand(b, 40, generator=gen) < 0.1).float() @ basis + 0.05 * torch.randn(b, D_IN, generator=gen)
            for _ in range(n_steps)]


# Tolerance: both paths compute the same sums in float32 in different orders (embedding_bag and
# sampled products against blocked matmuls), so values differ by a few ulps of the largest terms:
# ~1e-6 relative. 1e-5 relative to each tensor's largest entry leaves room for that and fails on
# any real difference (a missing or extra entry changes a gradient by its full size).
def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-12))


@pytest.mark.parametrize("dead", list(DEAD))
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_one_step_has_the_dense_loss_and_gradients(arch, dead):
    sparse, dense = _pair(arch, [3, 8], dead=DEAD[dead])  # a stack with different k
    x = _batches(1)[0]
    outs = []
    for g in (sparse, dense):
        out = g.forward_loss(x, 1.0)
        out.loss.backward()
        outs.append(out)
    assert _close(outs[0].loss.detach(), outs[1].loss.detach())
    assert torch.equal(outs[0].l0, outs[1].l0) and torch.equal(outs[0].fired, outs[1].fired)
    assert _close(outs[0].sse, outs[1].sse)
    for name, p in dense.named_parameters():
        assert _close(dict(sparse.named_parameters())[name].grad, p.grad), name
    # AuxK is part of it: without dead latents the loss is smaller.
    alive, _ = _pair(arch, [3, 8])
    alive.steps_since_fired.zero_()
    assert float(alive.forward_loss(x, 1.0).loss.detach()) < float(outs[1].loss.detach()) - 1e-3


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_weights_after_training_steps_match_the_dense_path(arch):
    sparse, dense = _pair(arch, [2, 5], dead_window_steps=6)
    opts = [torch.optim.Adam(g.parameters(), lr=1e-3) for g in (sparse, dense)]
    aux_steps = 0
    for i, x in enumerate(_batches(25)):
        aux_steps += bool(dense.dead_mask().any())
        for g, opt in zip((sparse, dense), opts):
            Trainer._step(g, opt, x, 1e-3, 1.0)
        assert torch.equal(sparse.steps_since_fired, dense.steps_since_fired), i
    assert aux_steps == 25  # dead latents (and AuxK) throughout
    # Weights move by up to lr = 1e-3 per step (0.025 in all). Step by step the gradients agree to
    # < 1e-6 of their size, but Adam divides each entry by its own running size, so an entry whose
    # gradient is a small, near-cancelling sum (a latent kept once in a batch) turns its rounding
    # difference into a visible step difference, and the paths drift apart there. Allowed: 1e-4 for
    # any entry (0.4% of the move), 1e-6 for 95% of them. A wrong or missing gradient entry moves
    # weights by ~lr per step and fails both bounds.
    for name, p in dense.named_parameters():
        diff = (dict(sparse.named_parameters())[name] - p).detach().abs()
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 0.05, (name, float(diff.max()))
    for name, buf in dense.named_buffers():
        assert _close(dict(sparse.named_buffers())[name].to(torch.float64), buf.to(torch.float64)), name


def test_auto_path_follows_the_density_and_can_be_forced():
    def path(arch: str, k: float, setting: str = "auto") -> str:
        cfg = TrainConfig(decoder_path=setting)
        return GROUP_CLASSES[arch]([SAESpec(0, arch, 8, k)], 64, cfg, torch.zeros(64)).decoder_path

    assert path("topk", 32) == "sparse" and path("batchtopk", 32) == "sparse"
    assert path("topk", 256) == "dense"  # k / d_sae = 1/2
    assert path("topk", 256, "sparse") == "sparse" and path("topk", 32, "dense") == "dense"
    assert path("standard", 5.0, "sparse") == "dense" and path("jumprelu", 0.01) == "dense"
    with pytest.raises(ConfigError, match="decoder_path 'fast'"):
        TrainConfig(decoder_path="fast").validate()


def test_grid_equals_each_sae_alone_on_the_sparse_path(small_cache, tmp_path):
    """Bit-exact, as for the dense path (tests/train/test_trainer.py): a stack with different k."""
    cfg = TrainConfig(tokens=4000, batch_tokens=100, lr=1e-3, lr_end=1e-4, eval_sequences=10, buffer_tokens=1000,
                      log_every=20, dead_window_steps=5, decoder_path="sparse")
    grid = GridConfig(layers=[3], architectures=["topk", "batchtopk"], expansion_factors=[2], k=[3, 6])
    Trainer(small_cache, tmp_path / "grid", cfg, grid, echo=lambda s: None, progress=False).run()
    from safetensors.torch import load_file

    for arch, k in (("topk", 3), ("batchtopk", 6)):
        alone = GridConfig(layers=[3], architectures=[arch], expansion_factors=[2], k=[k])
        Trainer(small_cache, tmp_path / arch, cfg, alone, echo=lambda s: None, progress=False).run()
        name = alone.specs()[0].name
        a = load_file(str(tmp_path / "grid" / name / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / arch / name / "sae_weights.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


MEMORY_SCRIPT = r"""
import gc, json, sys, torch
from fast_sae.train.config import SAESpec, TrainConfig
from fast_sae.train.memory import estimate, measure_peak_rss
from fast_sae.train.saes import GROUP_CLASSES
from fast_sae.train.saes.sparse_group import release_workspaces
from fast_sae.train.trainer import Trainer

d, ef, b, k = 128, 32, 2048, 16
x = torch.randn(b, d)

def run(arch, path, steps=3, dead=1 / 3):
    cfg = TrainConfig(decoder_path=path, batch_tokens=b, dead_window_steps=5)
    g = GROUP_CLASSES[arch]([SAESpec(0, arch, ef, k)], d, cfg, torch.zeros(d))
    g.steps_since_fired[:, : int(g.d_sae * dead)] = 100  # AuxK runs (on dead columns / on sparse entries)
    opt = torch.optim.Adam(g.parameters(), lr=1e-4)
    for _ in range(steps):
        Trainer._step(g, opt, x, 1e-4, 1.0)

run("topk", "sparse", 1)  # imports and one-time allocations
run("topk", "dense", 1)
out = []
for arch in ("topk", "batchtopk"):
    for path, dead in (("sparse", 1 / 3), ("sparse", 3 / 4), ("dense", 1 / 3)):
        release_workspaces()  # the sparse path's buffer counts, as on a run's first step
        gc.collect()
        peak = measure_peak_rss(lambda: run(arch, path, dead=dead))
        assert peak is not None, "measuring the peak needs Linux's /proc/self/status"
        est = estimate([SAESpec(0, arch, ef, k)], d, 1, TrainConfig(decoder_path=path, batch_tokens=b))
        out.append([arch, path, peak, est.sae_state + est.activations])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_memory_estimate_bounds_the_measured_peak_of_each_path():
    """The estimate (state + step activations) is above what the process really used, by < 2.5x."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = {}
    for arch, path, peak, est in rows:
        assert peak <= est <= 2.5 * peak, (arch, path, peak / 2**20, est / 2**20)
        peaks[arch, path] = peak
    for arch in ("topk", "batchtopk"):
        assert peaks[arch, "sparse"] < 0.75 * peaks[arch, "dense"], peaks


def test_estimate_line_names_the_paths_per_sae():
    from fast_sae.train.memory import estimate

    specs = [SAESpec(0, "topk", 8, 32), SAESpec(0, "topk", 8, 1024), SAESpec(0, "standard", 8, 5.0)]
    auto = estimate(specs, 576, 1, TrainConfig())
    assert "decoder path: 1 sparse, 2 dense" in auto.line()
    forced = estimate(specs, 576, 1, TrainConfig(decoder_path="sparse"))
    assert "decoder path: 2 sparse, 1 dense" in forced.line()
    dense = estimate(specs, 576, 1, TrainConfig(decoder_path="dense"))
    assert "decoder path: 0 sparse, 3 dense" in dense.line()
    assert forced.activations < dense.activations == forced.activations_all_dense


def test_cli_rejects_an_unknown_path(small_cache, tmp_path):
    from click.testing import CliRunner

    from fast_sae.train.cli import train_cmd

    bad = CliRunner().invoke(train_cmd, [str(small_cache), "--out", str(tmp_path / "bad"), "--decoder-path", "fast"])
    assert bad.exit_code != 0 and "Invalid value for '--decoder-path'" in bad.output


@pytest.mark.slow
def test_cli_option_reaches_the_run(small_cache, tmp_path):
    from click.testing import CliRunner

    from fast_sae.train.cli import train_cmd

    args = [str(small_cache), "--layers", "3", "--architectures", "topk", "--k", "2,8", "--expansion-factors", "2",
            "--tokens", "2000", "--batch-tokens", "100", "--buffer-tokens", "1000", "--eval-sequences", "10",
            "--no-progress"]
    auto = CliRunner().invoke(train_cmd, [*args, "--out", str(tmp_path / "auto")])
    assert auto.exit_code == 0, auto.output
    assert "decoder path: 1 sparse, 1 dense" in auto.output  # k / d_sae = 2/32 and 8/32
    forced = CliRunner().invoke(train_cmd, [*args, "--out", str(tmp_path / "forced"), "--decoder-path", "sparse"])
    assert forced.exit_code == 0, forced.output
    assert "decoder path: 2 sparse, 0 dense" in forced.output


def test_auxk_is_normalised_by_the_batch_variance_of_the_residual():
    """Gao et al.'s AuxK, alpha * MSE(e_hat, e) / MSE(batch mean of e, e), per SAE of the stack, times
    x's batch variance (the normaliser of their main loss, which ours does not divide by)."""
    from types import SimpleNamespace

    from fast_sae.train.saes.sparse_group import auxk_term

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    recon = torch.randn(3, 6, 4, generator=g)  # three SAEs
    e = x.unsqueeze(0) - recon
    mean_e = e.mean(1, keepdim=True).expand_as(e)
    group = SimpleNamespace(cfg=SimpleNamespace(aux_k_coefficient=0.5))
    has_dead = torch.tensor([True, True, False])
    x_var = float((x - x.mean(0)).pow(2).sum(-1).mean())
    for scale in (1.0, 1000.0):  # relative to the main loss, scale-free
        e_hat = torch.stack([mean_e[0], e[1], mean_e[2] + 1]) * scale
        out = auxk_term(group, e_hat, x * scale, recon * scale, has_dead) / (x_var * scale ** 2)
        # the batch mean scores 1, a perfect fit 0, an SAE without dead latents 0
        assert out.tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)
    e_hat = torch.zeros_like(e)
    expected = 0.5 * e[0].pow(2).mean() / (e[0] - e[0].mean(0)).pow(2).mean() * x_var
    assert float(auxk_term(group, e_hat, x, recon, has_dead)[0]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("shape, k", [((2, 64, 4608), 32), ((1, 37, 18432), 64), ((3, 5, 1152), 16),
                                      ((1, 8, 1000), 8), ((1, 8, 256), 32)])
def test_grouped_top_k_is_torchs_top_k(shape, k):
    """top_k_last gives torch.topk's values in the same (descending) order and the positions holding
    them, on random rows, on rows of ties and negatives, and where it falls back (small or odd widths)."""
    from fast_sae.train.saes.sparse import top_k_last

    gen = torch.Generator().manual_seed(k)
    for values in (torch.randn(shape, generator=gen),
                   torch.randint(-3, 3, shape, generator=gen).to(torch.float32),  # many ties, few positive
                   -torch.rand(shape, generator=gen)):  # no positive entry at all
        top, idx = top_k_last(values, k)
        ref, ref_idx = values.topk(k, dim=-1)
        assert torch.equal(top, ref)
        assert torch.equal(values.gather(-1, idx), top)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct positions per row
        if values.unique().numel() == values.numel():
            assert torch.equal(idx, ref_idx)  # no ties: the very same positions


def test_the_stacks_adam_is_fused_and_equals_the_reference_adam():
    """make_optimizer's fused Adam takes the same steps as torch's loop Adam (all parameters contiguous:
    torch 2.13's fused CPU kernel mis-updates non-contiguous ones)."""
    cfg = TrainConfig()
    gs = [GROUP_CLASSES["topk"]([SAESpec(0, "topk", 4, 8)], 16, cfg, torch.zeros(16)) for _ in range(2)]
    assert all(p.is_contiguous() for p in gs[0].parameters())
    fused = gs[0].make_optimizer()
    assert fused.defaults["fused"] is True
    loop = torch.optim.Adam(gs[1].optim_groups(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for g, opt in zip(gs, (fused, loop)):
            Trainer._step(g, opt, x, 1e-3, 1.0)
    for a, b in zip(gs[0].parameters(), gs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, kb", [((2, 64, 1024), 256), ((1, 128, 4608), 4096), ((1, 16, 64), 32)])
def test_batch_top_is_the_top_k_of_the_whole_batch(shape, kb):
    """BatchTopK's selection (the grouped CPU path, and the per-token path where groups do not pay)
    gives the values of a top-k over the whole batch, at positions holding them."""
    from fast_sae.train.saes.batchtopk import batch_top

    gen = torch.Generator().manual_seed(kb)
    for acts in (torch.relu(torch.randn(shape, generator=gen)),
                 torch.relu(torch.randint(-4, 3, shape, generator=gen).to(torch.float32))):  # ties, many zeros
        top, idx = batch_top(acts, kb)
        ref = acts.reshape(shape[0], -1).topk(kb, dim=-1)
        assert torch.equal(top, ref.values)
        assert torch.equal(acts.reshape(shape[0], -1).gather(-1, idx), top)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


def test_auxk_takes_the_sparse_pattern_when_k_aux_is_a_small_share_of_the_dead_columns():
    """k_aux 2 of 24 dead columns (of 64): the sparse pattern, not the dense column block; the same
    loss and gradients as the dense step all the same."""
    from fast_sae.train.saes import auxk

    pair = []
    for path in ("sparse", "dense"):
        g = GROUP_CLASSES["topk"]([SAESpec(0, "topk", EF, 4)], D_IN, TrainConfig(decoder_path=path, aux_k=2),
                                  torch.zeros(D_IN) + 0.1)
        g.steps_since_fired[0, :24] = 1000
        pair.append(g)
    x = _batches(1)[0]
    acts = pair[0].pre_activations(x)[0].detach()
    assert isinstance(auxk.plan(acts.clone(), pair[0].dead_mask()[0], 2), auxk.DeadEntries)
    assert isinstance(auxk.plan(acts.clone(), pair[0].dead_mask()[0], 8), auxk.DeadColumns)  # 8 of 24: dense
    outs = []
    for g in pair:
        out = g.forward_loss(x, 1.0)
        out.loss.backward()
        outs.append(out)
    assert _close(outs[0].loss.detach(), outs[1].loss.detach())
    for name, p in pair[1].named_parameters():
        assert _close(dict(pair[0].named_parameters())[name].grad, p.grad), name
