"""Saved checkpoints load through saeio and reproduce the training-time reconstruction on raw data."""
from __future__ import annotations

import json

import pytest
import torch

from fast_sae.saeio import CheckpointConfig, Normalization, get_architecture, load_sae, resid_post_hook
from fast_sae.train.config import SAESpec, TrainConfig
from fast_sae.train.export import save_group
from fast_sae.train.saes import GROUP_CLASSES


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk"])
def test_folded_checkpoint_matches_training_reconstruction(arch, tmp_path):
    torch.manual_seed(0)
    d_in, scale = 12, 3.7
    train_cfg = TrainConfig()
    specs = [SAESpec(2, arch, 3, 4 if arch in ("topk", "batchtopk") else 0.5), SAESpec(2, arch, 3, 6 if arch in
             ("topk", "batchtopk") else 1.0)]
    g = GROUP_CLASSES[arch](specs, d_in, train_cfg, torch.randn(d_in))
    with torch.no_grad():  # move away from the symmetric init so every weight matters
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if arch == "batchtopk":
            g.threshold.fill_(0.2)
        if arch == "jumprelu":
            g.threshold.fill_(0.135)
    x_raw = torch.randn(50, d_in) * 2 + 1
    with torch.no_grad():
        train_recon = g.decode(g.encode_inference(x_raw * scale)) / scale
    for i, spec in enumerate(specs):
        cfg = CheckpointConfig(architecture=arch, d_in=d_in, d_sae=g.d_sae, hook_name=resid_post_hook(2), k=spec.k,
                               apply_b_dec_to_input=g.apply_b_dec_to_input,
                               normalization=Normalization(method="all", factor=scale))
        folder = save_group(tmp_path / spec.name, g, i, scale, cfg)
        loaded = load_sae(folder)
        with torch.no_grad():
            got = loaded(x_raw)
            assert torch.allclose(got, train_recon[i], atol=1e-5, rtol=1e-4), (arch, i)
            feats = loaded.encode(x_raw)
            assert torch.allclose(feats, g.encode_inference(x_raw * scale)[i], atol=1e-5, rtol=1e-4)
        doc = json.loads((folder / "cfg.json").read_text())  # SAELens' architecture name; ours in metadata
        assert doc["architecture"] == get_architecture(arch).sae_lens_name
        assert doc["metadata"]["training_architecture"] == loaded.cfg.architecture == arch


def test_export_removes_temp_folders_of_dead_writers_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        g = GROUP_CLASSES["standard"]([SAESpec(2, "standard", 2, 0.5)], 8, TrainConfig(), torch.zeros(8))
        target = tmp_path / "L2_standard_x2_l1_0.5"
        stale, live = (target.with_name(f"{target.name}.{kind}-{pid}") for kind, pid in
                       (("tmp", dead.pid), ("tmp", alive.pid)))
        other = tmp_path / f"L2_standard_x4_l1_0.5.tmp-{dead.pid}"  # another SAE's: not this export's business
        for folder in (stale, live, other):
            folder.mkdir()
            (folder / "sae_weights.safetensors").write_bytes(b"\0" * 1024)
        cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": "blocks.2.hook_resid_post",
               "hook_layer": 2}
        save_group(target, g, 0, 1.0, cfg)
        assert load_sae(target).d_sae == 16
        assert not stale.exists() and live.is_dir() and other.is_dir()
    finally:
        alive.kill()
        alive.wait()
