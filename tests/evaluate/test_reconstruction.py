"""Reconstruction metrics against hand-computed values and numpy references on real caches."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, Role
from fast_sae.evaluate.reconstruction import ReconstructionConfig, evaluate_reconstruction
from fast_sae.evaluate.sources import choose_eval_sequences, load_entries
from fast_sae.saeio import load_sae

from .helpers import make_cache, save_constant_sae, save_identity_sae, save_random_sae

CFG = ReconstructionConfig(batch_tokens=3, progress=False)  # small batches: sums must cross batch/chunk edges


def _run(cache_path, sae_path, layer=0, cfg=CFG, verify=True):
    cache = ActivationCache.open(cache_path, verify=verify)
    entries = load_entries([sae_path])
    sel = choose_eval_sequences(entries, cache)
    return evaluate_reconstruction({"s": entries[0].sae}, cache, layer, sel, cfg)["s"]


def test_eq7_macro_average_over_unequal_sequences(tmp_path):
    # Sequence A: one token [2, 0] (sq. error 4 with a zero reconstruction).
    # Sequence B: [1, 0], [0, 1], [1, 1] (errors 1, 1, 2; mean 4/3).
    x = np.array([[2, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    cache = make_cache(tmp_path / "c", {0: x}, [1, 3])
    res = _run(cache, save_constant_sae(tmp_path / "zero", 2, 0, 0.0))
    all_ = res.subsets["all"]
    assert all_["mse"] == pytest.approx((4 + 4 / 3) / 2 / 2)  # eq. 7: macro over sequences, / H
    assert all_["log2_mse"] == pytest.approx(math.log2(4 / 3))
    assert all_["mse_token"] == pytest.approx(8 / 4 / 2)  # the micro average differs
    assert all_["nmse"] == pytest.approx(1.0)
    assert all_["l0"] == 0
    assert res.dead_fraction == 1.0 and res.dense_fraction == 0.0
    # centered variance: mean = [1, 0.5]; Σ‖x−μ‖² = (1+0.25)+(0+0.25)+(1+0.25)+(0+0.25) = 3
    assert all_["explained_variance"] == pytest.approx(1 - 8 / 3)


def test_identity_sae_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32) * 3
    cache = make_cache(tmp_path / "c", {0: x}, [5, 7, 8])
    res = _run(cache, save_identity_sae(tmp_path / "id", 4, 0))
    assert res.subsets["all"]["mse"] == 0 and res.subsets["all"]["log2_mse"] == float("-inf")
    assert res.subsets["all"]["explained_variance"] == pytest.approx(1.0)


def test_against_numpy_reference_with_roles(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [3, 9, 1, 6, 5]
    n, d, d_sae = sum(lengths), 6, 10
    x = (rng.normal(size=(n, d)) + 2.0).astype(np.float32)  # non-zero mean: EV must centre on it
    roles = rng.choice([int(Role.SPECIAL), int(Role.USER), int(Role.ASSISTANT), int(Role.BOS), int(Role.TEMPLATE)],
                       size=n).astype(np.uint8)
    roles[3:12] = int(Role.USER)  # sequence 1 has no special token: it must drop out of MSE_st's N
    x[roles == int(Role.SPECIAL)] *= 10  # high-norm special tokens, as in chat models
    cache = make_cache(tmp_path / "c", {0: x}, lengths, roles=roles, chunk_tokens=4)
    sae_path = save_random_sae(tmp_path / "r", d, d_sae, 0, seed=3)
    res = _run(cache, sae_path)

    sae = load_sae(sae_path)
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, k).numpy().astype(np.float64)
                                  for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    xd = x.astype(np.float64)
    f = np.maximum(xd @ W_enc + b_enc, 0)
    err = ((xd - (f @ W_dec + b_dec)) ** 2).sum(1)
    seq = np.repeat(np.arange(len(lengths)), lengths)

    def ref(mask):
        per_seq = [err[mask & (seq == s)].mean() for s in range(len(lengths)) if (mask & (seq == s)).any()]
        xm = xd[mask]
        return {"mse": np.mean(per_seq) / d, "n_sequences": len(per_seq),
                "explained_variance": 1 - err[mask].sum() / ((xm - xm.mean(0)) ** 2).sum(),
                "l0": (f[mask] > 0).sum(1).mean(), "nmse": err[mask].sum() / (xm ** 2).sum()}

    special = np.isin(roles, [int(Role.SPECIAL), int(Role.BOS), int(Role.TEMPLATE)])
    special_tokens = np.isin(roles, [int(Role.SPECIAL), int(Role.BOS)])
    for name, mask in {"all": np.ones(n, bool), "special": special, "content": ~special,
                       "special_tokens": special_tokens, "template": roles == int(Role.TEMPLATE),
                       "user": roles == int(Role.USER), "assistant": roles == int(Role.ASSISTANT)}.items():
        got = res.subsets[name]
        want = ref(mask)
        assert got["n_tokens"] == mask.sum(), name
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (name, key)  # SAE runs in float32
    assert res.subsets["special"]["n_sequences"] < len(lengths)  # sequence 1 has none
    assert res.subsets["system"]["n_tokens"] == 0 and res.subsets["system"]["n_sequences"] == 0
    freq = (f > 0).mean(0)
    assert np.allclose(res.feature_frequency, freq)
    assert res.dead_fraction == pytest.approx((freq == 0).mean())
    assert res.dense_fraction == pytest.approx((freq > 0.1).mean())


def test_several_saes_share_one_pass_and_stay_independent(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    cache = make_cache(tmp_path / "c", {0: x, 1: x * 2}, [4, 8])
    a = save_identity_sae(tmp_path / "run" / "a", 3, 1)
    save_constant_sae(tmp_path / "run" / "b", 3, 1, 0.0)
    c = ActivationCache.open(cache)
    entries = load_entries([tmp_path / "run"])
    assert [e.name for e in entries] == ["a", "b"] and entries[0].path == a
    sel = choose_eval_sequences(entries, c)
    out = evaluate_reconstruction({e.name: e.sae for e in entries}, c, 1, sel, CFG)
    assert out["a"].subsets["all"]["mse"] == 0
    x2 = (x.astype(np.float64) * 2)
    want = np.mean([(x2[:4] ** 2).sum(1).mean(), (x2[4:] ** 2).sum(1).mean()]) / 3  # layer 1, not layer 0
    assert out["b"].subsets["all"]["mse"] == pytest.approx(want)
    d = out["b"].to_dict()
    assert d["n_dead"] == 4 and d["density_histogram"]["n_never_fired"] == 4


@pytest.mark.slow
def test_sink_and_shared_prefix_subsets_by_hand(tmp_path):
    """Three sequences whose first two tokens are the same (ids 1, 2) and whose position 0 is a sink."""
    ids = [1, 2, 3, 10, 1, 2, 3, 11, 12, 1, 2, 4, 13]
    x = np.array([[100, 0], [1, 0], [0, 2], [1, 1],  # A
                  [100, 0], [1, 0], [0, 2], [2, 0], [0, 1],  # B
                  [100, 0], [1, 0], [1, 1], [0, 3]], dtype=np.float32)  # C
    pos = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3])
    roles = np.where(pos == 0, int(Role.SPECIAL), np.where(pos == 1, int(Role.TEMPLATE), int(Role.USER)))
    cache = make_cache(tmp_path / "c", {0: x}, [4, 5, 4], roles=roles.astype(np.uint8), token_ids=np.array(ids))
    res = _run(cache, save_constant_sae(tmp_path / "zero", 2, 0, 0.0))  # error = ‖x‖²
    full, no_pos0, no_prefix = res.subsets, res.filtered["no_pos0"], res.filtered["no_prefix"]
    # eq. 7 by hand: per-sequence means of ‖x‖², averaged over the 3 sequences, / 2 dims
    assert full["all"]["mse"] == pytest.approx((10007 / 4 + 10010 / 5 + 10012 / 4) / 3 / 2)
    assert no_pos0["all"]["mse"] == pytest.approx((7 / 3 + 10 / 4 + 12 / 3) / 3 / 2)
    assert no_prefix["all"]["mse"] == pytest.approx((6 / 2 + 9 / 3 + 11 / 2) / 3 / 2)  # shared prefix: 2 tokens
    assert [full["all"]["n_tokens"], no_pos0["all"]["n_tokens"], no_prefix["all"]["n_tokens"]] == [13, 10, 7]
    assert full["special"]["mse"] == pytest.approx((10001 / 2) * 3 / 3 / 2)
    assert no_pos0["special"]["mse"] == pytest.approx(0.5) and no_prefix["special"]["n_tokens"] == 0
    assert no_prefix["content"]["mse"] == pytest.approx(no_prefix["all"]["mse"])
    # norm outliers: ‖x‖ > 10 × median norm (2) = 20: the three sinks
    assert [full["all"]["n_norm_outliers"], no_pos0["all"]["n_norm_outliers"],
            no_prefix["all"]["n_norm_outliers"]] == [3, 0, 0]
    assert full["special"]["n_norm_outliers"] == 3
    info = res.to_dict()["token_filters"]
    assert info["shared_prefix_length"] == 2 and info["headline"] == "no_prefix"
    assert info["norm_outliers"]["median_norm"] == pytest.approx(2.0)
    assert res.to_dict()["subsets_no_prefix"]["all"]["mse"] == no_prefix["all"]["mse"]

    # no shared token: the prefix filter still drops position 0 (a sink whether shared or not)
    ids2 = [5, 2, 3, 10, 1, 2, 3, 11, 12, 1, 2, 4, 13]
    cache2 = make_cache(tmp_path / "c2", {0: x}, [4, 5, 4], roles=roles.astype(np.uint8), token_ids=np.array(ids2))
    res2 = _run(cache2, save_constant_sae(tmp_path / "zero2", 2, 0, 0.0))
    assert res2.to_dict()["token_filters"]["shared_prefix_length"] == 0
    assert res2.filtered["no_prefix"]["all"]["mse"] == pytest.approx(no_pos0["all"]["mse"])


def test_headline_filter_removes_each_documents_shared_prefix_inside_blocks(tmp_path):
    """BT blocks: ★ drops each block's position 0 and the prefix every document starts with, wherever
    the document starts (also when a block boundary cuts the prefix), not a prefix shared by blocks."""
    # three documents [7, 8, 1, 2], [7, 8, 3], [7, 8, 4, 5, 6] packed into blocks of 4 tokens
    ids = np.array([7, 8, 1, 2, 7, 8, 3, 7, 8, 4, 5, 6])
    docs = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    x = np.arange(1, 13, dtype=np.float32).reshape(-1, 1).repeat(2, axis=1)
    cache = make_cache(tmp_path / "bt", {0: x}, [4, 4, 4], token_ids=ids, doc_ids=docs, regime="bt-f")
    res = _run(cache, save_constant_sae(tmp_path / "zero", 2, 0, 0.0))
    kept = {f: res.filtered[f]["all"]["n_tokens"] for f in ("no_pos0", "no_prefix")}
    # no_pos0 drops tokens 0, 4, 8; no_prefix also drops the prefix [7, 8] of documents 1 and 2 (4-5, 7-8)
    assert kept == {"no_pos0": 9, "no_prefix": 6}
    info = res.to_dict()["token_filters"]
    assert info["shared_prefix_length"] == 2 and info["prefix_documents"] == 3
    # sum of ‖x‖² / 2 over the kept tokens 2, 3, 6, 9, 10, 11 (0-based), one block per sequence
    sq = (x.astype(np.float64) ** 2).sum(1)
    per_block = [sq[[2, 3]].mean(), sq[[6]].mean(), sq[[9, 10, 11]].mean()]
    assert res.filtered["no_prefix"]["all"]["mse"] == pytest.approx(np.mean(per_block) / 2)
    # the stream's last document cut after one token by the token budget: the prefix is still [7, 8]
    cut = make_cache(tmp_path / "cut", {0: np.vstack([x, x[:1]])}, [4, 4, 5], token_ids=np.r_[ids, 7],
                     doc_ids=np.r_[docs, 3], regime="bt-f")
    res = _run(cut, save_constant_sae(tmp_path / "zero_cut", 2, 0, 0.0))
    assert res.to_dict()["token_filters"]["shared_prefix_length"] == 2
    assert res.filtered["no_prefix"]["all"]["n_tokens"] == 6


@pytest.mark.slow
def test_non_finite_inputs_are_counted_and_log2_stays_non_finite(tmp_path):
    from safetensors.torch import load_file

    from fast_sae.evaluate.reconstruction import log2_mse, non_finite_warnings
    from fast_sae.saeio import save_sae

    from .helpers import sae_cfg

    assert math.isnan(log2_mse(float("nan"))) and log2_mse(float("inf")) == float("inf")
    assert log2_mse(0.0) == float("-inf") and log2_mse(0.25) == -2.0
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    # NaN activations never reach the metrics: the cache writer refuses them, and a damaged chunk file
    # (read without checksums) is refused by the reader in one line naming the token
    cache = make_cache(tmp_path / "c", {0: x}, [6, 6])
    chunk = cache / "acts" / "layer_0" / "c" / "0" / "0"
    data = np.fromfile(chunk, "<f4")
    data[7 * 4 + 2] = np.nan
    data.tofile(chunk)
    from fast_sae.actcache import CacheError

    with pytest.raises(CacheError, match=r"non-finite activations \(token 7\)"):
        _run(cache, save_identity_sae(tmp_path / "id", 4, 0), verify=False)
    sae = save_random_sae(tmp_path / "r", 4, 8, 0)
    w = load_file(str(sae / "sae_weights.safetensors"))
    w["b_enc"][1] = float("inf")
    save_sae(sae, w, sae_cfg(4, 8, 0))
    clean = make_cache(tmp_path / "clean", {0: np.nan_to_num(x)}, [6, 6])
    res = _run(clean, sae)
    assert res.extra["non_finite"]["weights"] == ["b_enc"] and res.extra["non_finite"]["output_tokens"] == 12
    mse, log2 = res.subsets["all"]["mse"], res.subsets["all"]["log2_mse"]
    assert not math.isfinite(mse) and not math.isfinite(log2) and log2 != float("-inf")
    warnings = non_finite_warnings("r", res)
    assert any("non-finite weights (b_enc)" in w for w in warnings)
    assert any("MSE is non-finite on subset(s) all" in w for w in warnings)
