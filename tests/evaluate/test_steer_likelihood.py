"""The judge-free intervention measure on the real embedded model and a harvested chat cache: held-out
conversations are what they claim, alpha 0 is the unsteered likelihood exactly, a huge push lowers it,
the controls are what they claim, and the numbers reach report.md and compare.md."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache, Role
from fast_sae.evaluate.compare import run_compare
from fast_sae.evaluate.config import EvalConfig, InterventionSettings
from fast_sae.evaluate.downstream import DownstreamConfig
from fast_sae.evaluate.interpret import JudgeConfig
from fast_sae.evaluate.intervention import SteeringSpec, steering, steering_direction
from fast_sae.evaluate.runner import run_evaluation
from fast_sae.evaluate.steer_likelihood import (
    held_out_conversations,
    matched_features,
    measure,
    reply_loglik,
)
from fast_sae.lm import EMBEDDED_MODEL
from fast_sae.saeio import load_sae, save_sae

LAYER = 2


@pytest.fixture(scope="module")
def random_sae(tmp_path_factory, embedded_model):
    """A random standard SAE on layer 2 of the embedded model (64 unit-norm decoder rows, sparse-ish codes)."""
    d, d_sae = embedded_model[0].config.hidden_size, 64
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d, generator=g)
    return save_sae(tmp_path_factory.mktemp("lik") / "run" / "sae",
                    {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5,
                     "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
                     "b_enc": torch.full((d_sae,), -0.5), "b_dec": torch.zeros(d)},
                    {"architecture": "standard", "d_in": d, "d_sae": d_sae, "hook_layer": LAYER,
                     "hook_name": f"blocks.{LAYER}.hook_resid_post", "model_name": EMBEDDED_MODEL})


def test_matched_features_by_hand():
    freq = np.array([0.1, 0.0, 0.09, 0.5, 0.06, 0.25, 0.001])
    picked = matched_features(freq, [0], 2, seed=0)
    assert sorted(picked) == [2, 4]  # within a factor of 2 of 0.1, never the target, never dead (1)
    assert matched_features(freq, [6], 1, seed=0) == [4]  # none within 2x: the nearest in log frequency


@pytest.mark.slow
def test_likelihood_on_the_embedded_model(fast_cache, embedded_model, random_sae):
    model, _ = embedded_model
    cache = ActivationCache.open(fast_cache)
    sae = load_sae(random_sae)
    convs = held_out_conversations(cache, None, n=3, reply_tokens=6, seed=0)
    assert len(convs) == 3
    roles, ids = cache.roles(), cache.token_ids()
    for c in convs:
        first = c.start + len(c.context)
        assert (roles[first:first + len(c.reply)] == int(Role.ASSISTANT)).all() and 1 <= len(c.reply) <= 6
        assert (roles[c.start:first] == int(Role.USER)).any() and ids[first:first + len(c.reply)].tolist() == c.reply
    clean = reply_loglik(model, convs, batch_size=2)
    assert np.isfinite(clean).all() and (clean < 0).all()
    # one by one (no padding) gives the same values as right-padded batches
    np.testing.assert_allclose(reply_loglik(model, convs, batch_size=1), clean, rtol=0, atol=1e-4)
    d = steering_direction(sae, 5, "unit")
    with steering(model, SteeringSpec(layer=LAYER, direction=d, alpha=0.0)):
        assert np.array_equal(reply_loglik(model, convs, batch_size=2), clean)  # alpha 0: exactly unsteered
    with steering(model, SteeringSpec(layer=LAYER, direction=d, alpha=2000.0)):
        pushed = reply_loglik(model, convs, batch_size=2)
    assert np.isfinite(pushed).all() and (pushed < clean).all()  # a huge push makes the reference reply unlikely

    result = measure(model, sae, cache, layer=LAYER, features=[5], alphas=(0, 2000), token_ranges=None,
                     n_conversations=3, reply_tokens=6, n_random=2, n_matched=2, batch_size=2)
    assert result["alpha0_identical"] is True and result["n_conversations"] == 3
    zero, huge = result["rows"]
    assert zero["special"]["mean"] == 0.0 and zero["random_direction"]["mean"] == 0.0
    assert huge["special"]["mean"] < 0 and huge["random_direction"]["mean"] < 0
    assert huge["special"]["mean"] == pytest.approx(float(np.mean(pushed - clean)), abs=1e-9)
    assert all(np.isfinite(v) for r in result["rows"] for g in ("special", "random_direction", "matched_feature")
               for v in (r[g]["mean"], r[g]["se"]))
    assert len(result["matched_features"]) == 2 and 5 not in result["matched_features"]


@pytest.mark.slow
def test_likelihood_in_report_and_compare(fast_cache, embedded_model, random_sae, tmp_path):
    out = tmp_path / "eval"
    iv = InterventionSettings(enabled=True, alphas=(0, 50), generate=False, conversations=3, reply_tokens=4,
                              random_directions=1, matched_features=1)
    report = run_evaluation(EvalConfig(saes=[random_sae.parent], caches=[fast_cache], out=out, progress=False,
                                       plots=False, downstream=DownstreamConfig(enabled=False), intervention=iv,
                                       judge=JudgeConfig(enabled=False)),
                            log=lambda _m: None, models={EMBEDDED_MODEL: embedded_model})
    lik = report["rows"][0]["intervention"]["likelihood"]
    assert lik["n_conversations"] >= 2 and lik["alpha0_identical"] and [r["alpha"] for r in lik["rows"]] == [0, 50]
    assert "judge_calibration" not in report  # no judge asked: nothing to calibrate
    md = (out / "report.md").read_text()
    assert "Reference-reply likelihood under steering (no judge)" in md and "| 50 |" in md
    _, cmp_md, files = run_compare([out], tmp_path / "cmp")
    assert "### Special-token intervention: reference-reply likelihood (no judge)" in cmp_md
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["groups"][0]["intervention"][0]["likelihood"]["rows"][1]["alpha"] == 50
