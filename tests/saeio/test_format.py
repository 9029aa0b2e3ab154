import json

import pytest
import torch

from fast_sae.saeio import CheckpointError, load_sae, save_sae


def _weights(d=6, n=12):
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(d, n, generator=g), "W_dec": torch.randn(n, d, generator=g),
            "b_enc": torch.randn(n, generator=g), "b_dec": torch.randn(d, generator=g),
            "threshold": torch.rand(n, generator=g)}


def _cfg(arch, **kw):
    return {"architecture": arch, "d_in": 6, "d_sae": 12, "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2, **kw}


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk"])
def test_round_trip_and_inference(tmp_path, arch):
    w = _weights()
    save_sae(tmp_path / "s", w, _cfg(arch, k=3, apply_b_dec_to_input=arch == "topk"))
    sae = load_sae(tmp_path / "s")
    x = torch.randn(5, 6)
    x_in = x - w["b_dec"] if arch == "topk" else x
    pre = x_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        f = torch.relu(pre)
    elif arch in ("jumprelu", "batchtopk"):
        f = torch.relu(pre) * (pre > w["threshold"])
    else:
        v, i = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, i, torch.relu(v))
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="cfg.json: missing"):
        load_sae(tmp_path)
    w = _weights()
    save_sae(tmp_path / "s", w, _cfg("jumprelu"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 13}))
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(6, 12\), expected \(6, 13\)"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(CheckpointError, match="architecture 'gated'"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_sae(tmp_path / "s")
    with pytest.raises(CheckpointError, match="missing field 'hook_layer'"):
        save_sae(tmp_path / "t", w, {"architecture": "standard", "d_in": 6, "d_sae": 12, "hook_name": "h"})


@pytest.mark.parametrize("value", ["abc", "12", 12.5, None, [12], True, 0])
def test_d_sae_of_the_wrong_type_is_a_one_line_error(tmp_path, value):
    save_sae(tmp_path / "s", _weights(), _cfg("standard"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": value}))
    with pytest.raises(CheckpointError, match=r"cfg.json: field 'd_sae' must be a positive integer, got "):
        load_sae(tmp_path / "s")


@pytest.mark.slow
def test_d_sae_of_the_wrong_type_through_the_cli(tmp_path):
    import numpy as np

    from fast_sae.actcache.from_arrays import write_cache_from_arrays
    from tests.helpers import run_cli

    cache = write_cache_from_arrays(tmp_path / "c", {2: np.ones((40, 6), np.float32)},
                                    seq_starts=np.array([0, 20, 40]), chunk_tokens=16)
    save_sae(tmp_path / "s", _weights(), _cfg("standard"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": "twelve"}))
    proc = run_cli("evaluate", "--sae", str(tmp_path / "s"), "--eval-cache", str(cache), "--out", str(tmp_path / "o"),
                   "--no-downstream", "--no-plots", "--no-progress", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 's' / 'cfg.json'}: field 'd_sae' must be a positive integer, got 'twelve'"]
