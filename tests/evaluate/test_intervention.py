"""Special-token intervention: feature discovery on known values, exact steering, alpha 0 = unmodified,
and an end-to-end run on the embedded model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache, Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.interpret import JudgeConfig
from fast_sae.evaluate.intervention import (
    SteeringSpec,
    default_prompts,
    generate_reply,
    run_intervention,
    steering,
    steering_direction,
)
from fast_sae.evaluate.special_features import pick_features, special_token_features
from fast_sae.lm import EMBEDDED_MODEL, decoder_layers
from fast_sae.saeio import load_sae, save_sae

LAYER = 2


def identity_sae(folder, d):
    eye = torch.eye(d)
    return save_sae(folder, {"W_enc": eye, "W_dec": eye.clone(), "b_enc": torch.zeros(d), "b_dec": torch.zeros(d)},
                    {"architecture": "standard", "d_in": d, "d_sae": d, "hook_name": "blocks.0.hook_resid_post",
                     "hook_layer": 0})


@pytest.mark.slow
def test_special_token_features_average_max_on_known_values(tmp_path):
    S, U = int(Role.SPECIAL), int(Role.USER)
    acts = np.array([[1, 0, 0], [9, 9, 9], [3, 0, 1], [0, 2, 0],  # doc 0: token 1, user, token 1, token 2
                     [5, 0, 0], [9, 9, 9], [0, 4, 0],  # doc 1: token 1, user, token 2
                     [9, 9, 9]], np.float32)  # doc 2: user only
    ids = [1, 5, 1, 2, 1, 6, 2, 7]
    roles = [S, U, S, S, S, U, S, U]
    cache = ActivationCache.open(write_cache_from_arrays(tmp_path / "c", {0: acts}, seq_starts=[0, 4, 7, 8],
                                                         token_ids=ids, roles=roles, chunk_tokens=3))
    sae = load_sae(identity_sae(tmp_path / "s", 3))
    for block in (1, 4096):  # docs straddle chunks and blocks
        table = special_token_features(sae, cache, top_k=2, block_tokens=block)
        assert [t["token_id"] for t in table] == [1, 2]
        t1, t2 = table
        assert (t1["n_samples"], t1["n_occurrences"], t2["n_samples"]) == (2, 3, 2)
        # token 1: per-doc max [3,0,1] and [5,0,0] -> mean [4, 0, 0.5]; token 2: [0,2,0], [0,4,0] -> [0,3,0]
        assert [(e["feature"], e["value"]) for e in t1["top"]] == [(0, 4.0), (2, 0.5)]
        assert t2["top"][0] == {"feature": 1, "value": 3.0}
    assert pick_features(table, 1) == [0] and pick_features(table, 2) == [0, 1]
    assert t1["marker"] and t2["marker"]
    # a plain template token (role name) is listed but not ranked while marker tokens exist
    table.append({"token_id": 9, "token": "user", "marker": False, "n_samples": 1, "n_occurrences": 1,
                  "top": [{"feature": 2, "value": 99.0}]})
    assert pick_features(table, 1) == [0]
    assert pick_features([table[-1]], 1) == [2]
    # discovery on held-out sequences only (token ranges): doc 1 alone
    held = special_token_features(sae, cache, top_k=2, token_ranges=[(4, 7)])
    assert [(t["token_id"], t["n_samples"]) for t in held] == [(1, 1), (2, 1)]
    assert held[0]["top"][0] == {"feature": 0, "value": 5.0} and held[1]["top"][0] == {"feature": 1, "value": 4.0}


@pytest.fixture(scope="module")
def steer_sae(tmp_path_factory, embedded_model) -> Path:
    """A random standard SAE on layer 2 of the embedded model (d_in 576, 64 unit-norm decoder rows)."""
    model, _ = embedded_model
    d, d_sae = model.config.hidden_size, 64
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d, generator=g)
    return save_sae(tmp_path_factory.mktemp("steer") / "sae",
                    {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5,
                     "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
                     "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)},
                    {"architecture": "standard", "d_in": d, "d_sae": d_sae, "hook_layer": LAYER,
                     "hook_name": f"blocks.{LAYER}.hook_resid_post", "model_name": EMBEDDED_MODEL})


def _layer_output(model, layer, input_ids):
    store = {}

    def grab(_m, _a, out):
        store["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = decoder_layers(model)[layer].register_forward_hook(grab)  # registered last: sees the steered output
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        handle.remove()
    return store["h"]


@pytest.mark.slow
def test_steering_adds_exactly_alpha_times_decoder_row(embedded_model, steer_sae):
    model, tok = embedded_model
    sae = load_sae(steer_sae)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    clean = _layer_output(model, LAYER, ids)
    clean_next = _layer_output(model, LAYER + 1, ids)
    d_k = sae.W_dec[7]
    alpha = 25.0
    spec = SteeringSpec(layer=LAYER, direction=d_k, alpha=alpha, special_ids=tuple(tok.all_special_ids))
    n_hooks = len(decoder_layers(model)[LAYER]._forward_hooks)  # transformers may keep its own capture hook
    with steering(model, spec):
        steered = _layer_output(model, LAYER, ids)
        steered_next = _layer_output(model, LAYER + 1, ids)
    torch.testing.assert_close(steered - clean, (alpha * d_k).expand_as(clean), atol=1e-4, rtol=0)
    assert not torch.allclose(steered_next, clean_next)  # the change propagates downstream
    assert len(decoder_layers(model)[LAYER]._forward_hooks) == n_hooks  # ours removed on exit
    spec.positions = "special"
    with steering(model, spec):
        steered = _layer_output(model, LAYER, ids)
    special = torch.isin(ids[0], torch.tensor(tok.all_special_ids))
    assert special.any() and (~special).any()
    diff = (steered - clean)[0]
    assert torch.equal(diff[~special], torch.zeros_like(diff[~special]))
    torch.testing.assert_close(diff[special], (alpha * d_k).expand(int(special.sum()), -1), atol=1e-4, rtol=0)
    # scale mode with alpha 1 is the identity; alpha 0 removes the feature's own contribution
    with steering(model, SteeringSpec(layer=LAYER, direction=d_k, alpha=1.0, mode="scale", sae=sae, feature=7)):
        assert torch.equal(_layer_output(model, LAYER, ids), clean)
    with steering(model, SteeringSpec(layer=LAYER, direction=d_k, alpha=0.0, mode="scale", sae=sae, feature=7)):
        ablated = _layer_output(model, LAYER, ids)
    expected = clean - sae.encode(clean)[..., 7:8] * d_k
    torch.testing.assert_close(ablated, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_steering_with_alpha_on_the_unit_direction_moves_the_residual_by_exactly_alpha(tmp_path, embedded_model):
    """A folded checkpoint's decoder rows have norm 1/s (here 7); the paper's d_k is unit-norm."""
    model, tok = embedded_model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(4, d, generator=g)
    w_dec = 7.0 * w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = load_sae(save_sae(tmp_path / "folded", {"W_enc": torch.randn(d, 4, generator=g), "W_dec": w_dec,
                                                  "b_enc": torch.zeros(4), "b_dec": torch.zeros(d)},
                            {"architecture": "standard", "d_in": d, "d_sae": 4, "hook_layer": LAYER,
                             "hook_name": f"blocks.{LAYER}.hook_resid_post"}))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    clean = _layer_output(model, LAYER, ids)
    unit = steering_direction(sae, 2, "unit")
    assert float(unit.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(unit, w_dec[2] / 7.0, atol=1e-6)
    for kind, scale in (("unit", 1.0), ("raw_folded", 7.0)):
        with steering(model, SteeringSpec(layer=LAYER, direction=steering_direction(sae, 2, kind), alpha=15.0)):
            moved = (_layer_output(model, LAYER, ids) - clean)[0].norm(dim=-1)
        torch.testing.assert_close(moved, torch.full_like(moved, 15.0 * scale), atol=2e-3, rtol=0)
    with pytest.raises(EvalError, match="steering direction"):
        steering_direction(sae, 2, "folded")


@pytest.mark.slow
def test_alpha_zero_reproduces_unmodified_generation(embedded_model, steer_sae):
    model, tok = embedded_model
    sae = load_sae(steer_sae)
    text, ids = generate_reply(model, tok, "Name a fruit.", 12)
    assert len(ids) > 0 and isinstance(text, str)
    for positions in ("all", "special"):
        spec = SteeringSpec(layer=LAYER, direction=sae.W_dec[3], alpha=0.0, positions=positions,
                            special_ids=tuple(tok.all_special_ids))
        with steering(model, spec):
            assert generate_reply(model, tok, "Name a fruit.", 12) == (text, ids)
    with steering(model, SteeringSpec(layer=LAYER, direction=sae.W_dec[3] / sae.W_dec[3].norm(), alpha=200.0)):
        steered_text, steered_ids = generate_reply(model, tok, "Name a fruit.", 12)
    assert steered_ids != ids  # a large push along a direction does change the reply


@pytest.mark.slow
def test_run_intervention_end_to_end(embedded_model, steer_sae, fast_cache, tmp_path):
    sae, cache, lm = steer_sae, fast_cache, embedded_model
    judge = JudgeConfig(backend="local", model=EMBEDDED_MODEL, max_new_tokens=8, retries=0)
    summary = run_intervention(sae, cache, tmp_path / "out", prompts=["Say hello."], alphas=(0, 50),
                               max_new_tokens=6, judge=judge, model=lm)
    doc = json.loads((tmp_path / "out" / "intervention.json").read_text())
    md = (tmp_path / "out" / "intervention.md").read_text()
    assert summary["layer"] == LAYER and len(summary["features"]) == 1 and summary["direction"] == "unit"
    assert summary["judge"]["scores_meaningful"] is False and "not meaningful" in md
    assert [r["alpha"] for r in doc["rows"]] == [0.0, 50.0]
    assert doc["rows"][0]["n_identical_to_unmodified"] == 1
    assert doc["rows"][0]["replies"][0]["reply"] == doc["unmodified"][0]["reply"]
    top_feature = max((e["value"], e["feature"]) for t in doc["special_token_features"] if t["marker"]
                      for e in t["top"])[1]
    assert summary["features"] == [top_feature]
    c = ActivationCache.open(cache)
    im_start = next(t for t in doc["special_token_features"] if t["token_id"] == 1)  # <|im_start|>
    at = (c.token_ids() == 1) & np.isin(c.roles(), [int(r) for r in (Role.BOS, Role.SPECIAL, Role.TEMPLATE)])
    assert im_start["n_samples"] == len(np.unique(c.doc_ids()[at])) and im_start["token"] == "<|im_start|>"
    for item in doc["unmodified"] + [r for row in doc["rows"] for r in row["replies"]]:
        assert (item["score"] is None) != (item["reason"] is None)  # scored, or unscored with a reason
        assert item["score"] is None or 1 <= item["score"] <= 10
    replies = doc["unmodified"] + [r for row in doc["rows"] for r in row["replies"]]
    distinct = {(r["prompt"], r["reply"]) for r in replies}
    assert doc["judge_backend_calls"] == len(distinct)  # alpha 0 = unmodified: asked once, then cached
    assert "| feature | alpha |" in md and f"| {top_feature} | 50 |" in md
    # rerun: every judge reply comes from the cache
    again = run_intervention(sae, cache, tmp_path / "out", prompts=["Say hello."], alphas=(0, 50),
                             max_new_tokens=6, judge=judge, model=lm)
    assert again["judge_backend_calls"] == 0


def test_default_prompts_ship_with_the_repo():
    prompts = default_prompts()
    assert len(prompts) >= 3 and all(isinstance(p, str) and p for p in prompts)
