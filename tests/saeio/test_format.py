"""Saving and loading checkpoints: inference per architecture, atomic folders, one-line errors."""
import json

import pytest
import torch

from fast_sae.saeio import CheckpointConfig, CheckpointError, load_sae, resid_post_hook, save_sae


def _weights(threshold: bool, d=6, n=12):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d, n, generator=g), "W_dec": torch.randn(n, d, generator=g),
         "b_enc": torch.randn(n, generator=g), "b_dec": torch.randn(d, generator=g)}
    if threshold:
        w["threshold"] = torch.rand(n, generator=g)
    return w


def _cfg(arch, **kw):
    return CheckpointConfig(architecture=arch, d_in=6, d_sae=12, hook_name=resid_post_hook(2), **kw)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk"])
def test_round_trip_and_inference(tmp_path, arch):
    w = _weights(arch in ("jumprelu", "batchtopk"))
    cfg = _cfg(arch, k=3 if arch in ("topk", "batchtopk") else None, apply_b_dec_to_input=arch == "topk")
    save_sae(tmp_path / "s", w, cfg)
    sae = load_sae(tmp_path / "s")
    assert sae.cfg == cfg and sae.layer == 2 and (sae.d_in, sae.d_sae) == (6, 12)
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
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])
    assert {k: torch.equal(v, w[k]) for k, v in sae.weights().items()} == {k: True for k in w}
    assert not list(tmp_path.glob("s.*"))  # no temporary or old folder left behind


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="cfg.json: missing"):
        load_sae(tmp_path)
    w = _weights(True)
    save_sae(tmp_path / "s", w, _cfg("jumprelu"))
    cfg_file = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "d_sae": 13}))
    with pytest.raises(CheckpointError, match=r"safetensors: W_enc has shape \(6, 12\), expected \(6, 13\)"):
        load_sae(tmp_path / "s")
    cfg_file.write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(CheckpointError, match=r"cfg.json: field 'architecture' is 'gated'"):
        load_sae(tmp_path / "s")
    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="cfg.json: corrupt JSON"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_sae(tmp_path / "s")


def test_save_refuses_what_it_could_not_load(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'threshold' missing"):
        save_sae(tmp_path / "a", _weights(False), _cfg("jumprelu"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'threshold' for a standard SAE"):
        save_sae(tmp_path / "b", _weights(True), _cfg("standard"))
    with pytest.raises(CheckpointError, match="topk checkpoint without a positive integer field 'k'"):
        save_sae(tmp_path / "c", _weights(False), _cfg("topk"))
    with pytest.raises(CheckpointError, match="hook_name 'blocks.2.hook_mlp_out' cannot be scored"):
        save_sae(tmp_path / "d", _weights(False), CheckpointConfig("standard", 6, 12, "blocks.2.hook_mlp_out"))
    with pytest.raises(CheckpointError, match="missing field 'hook_name'"):
        save_sae(tmp_path / "e", _weights(False), {"architecture": "standard", "d_in": 6, "d_sae": 12})
    assert not list(tmp_path.iterdir())


def test_a_mapping_is_read_like_a_cfg_json(tmp_path):
    """save_sae accepts the dict a cfg.json would hold (any layout load_sae reads)."""
    flat = {"architecture": "standard", "d_in": 6, "d_sae": 12, "hook_name": "blocks.4.hook_resid_post",
            "apply_b_dec_to_input": False, "regime": "bt-p", "eval_sequence_range": [3, 5]}
    sae = load_sae(save_sae(tmp_path / "s", _weights(False), flat))
    assert sae.layer == 4 and sae.cfg.regime == "bt-p" and sae.cfg.eval_sequence_ranges == [(3, 5)]
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]["sae_lens_version"] == "6.0.0"


@pytest.mark.parametrize("value", ["abc", "12", 12.5, None, [12], True, 0])
def test_d_sae_of_the_wrong_type_is_a_one_line_error(tmp_path, value):
    save_sae(tmp_path / "s", _weights(False), _cfg("standard"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": value}))
    with pytest.raises(CheckpointError,
                       match=r"cfg.json: (field 'd_sae' = .+, expected (int|a positive integer)"
                             r"|missing field 'd_sae')$"):
        load_sae(tmp_path / "s")


@pytest.mark.slow
def test_d_sae_of_the_wrong_type_through_the_cli(tmp_path):
    import numpy as np

    from fast_sae.actcache.from_arrays import write_cache_from_arrays
    from tests.helpers import run_cli

    cache = write_cache_from_arrays(tmp_path / "c", {2: np.ones((40, 6), np.float32)},
                                    seq_starts=np.array([0, 20, 40]), chunk_tokens=16)
    save_sae(tmp_path / "s", _weights(False), _cfg("standard"))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": "twelve"}))
    proc = run_cli("evaluate", "--sae", str(tmp_path / "s"), "--eval-cache", str(cache), "--out", str(tmp_path / "o"),
                   "--no-downstream", "--no-plots", "--no-progress", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 's' / 'cfg.json'}: field 'd_sae' = 'twelve', expected int"]
