"""Top examples are the true arg-max positions, and density/max/mean are right, on known inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.evaluate.interpret.top_examples import (
    TokenRenderer,
    collect_top_examples,
    feature_contexts,
    sample_features,
)
from fast_sae.saeio import load_sae, save_sae


def first_copies(ids: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Per token, exactly (tuples, no hash): whether no earlier token has the same id and ``window`` ids before."""
    seen, first = set(), np.zeros(len(ids), dtype=bool)
    for s in range(len(starts) - 1):
        a, b = int(starts[s]), int(starts[s + 1])
        for t in range(a, b):
            ctx = tuple(ids[max(a, t - window):t + 1].tolist())
            first[t] = ctx not in seen
            seen.add(ctx)
    return first


def brute_force(feats: np.ndarray, starts: np.ndarray, top_n: int, eligible: np.ndarray | None = None):
    """Per feature: sequences sorted by their max activation (desc), with the first arg-max token; with
    ``eligible``, only over those tokens."""
    out = []
    for k in range(feats.shape[1]):
        rows = []
        col = feats[:, k] if eligible is None else np.where(eligible, feats[:, k], -np.inf)
        for s in range(len(starts) - 1):
            seg = col[starts[s]:starts[s + 1]]
            rows.append((float(seg.max()), int(starts[s] + seg.argmax()), s))
        rows.sort(key=lambda r: -r[0])
        out.append([r for r in rows[:top_n] if r[0] > 0])
    return out


@pytest.mark.slow
def test_top_examples_match_brute_force(synthetic):
    sae_dir, cache_path, acts, starts = synthetic
    sae, cache = load_sae(sae_dir), ActivationCache.open(cache_path)
    with torch.no_grad():
        feats = sae.encode(torch.from_numpy(acts)).numpy()
    # small blocks: sequences span blocks and chunks, exercising the cross-block deduplication
    for block in (37, 128, 10_000):
        top = collect_top_examples(sae, cache, top_n=5, block_tokens=block)
        expected = brute_force(feats, starts, 5)
        for k in range(feats.shape[1]):
            got = [(float(v), int(t), int(s)) for v, t, s in
                   zip(top.values[k], top.token_index[k], top.seq_index[k]) if v > 0]
            assert [g[1:] for g in got] == [e[1:] for e in expected[k]], (block, k)
            np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected[k]], rtol=1e-6)
            assert len(set(s for _, _, s in got)) == len(got)  # one context per sequence


def test_density_max_mean_on_known_values(tmp_path):
    # identity-encoder SAE: feature k activation = relu(x_k); known, hand-checkable values
    d = 4
    acts = np.zeros((10, d), np.float32)
    acts[[1, 4, 7], 0] = [1.0, 5.0, 2.0]  # feature 0: 3/10 active, max 5 at token 4 (sequence 1)
    acts[:, 1] = -1.0  # feature 1: dead
    acts[9, 2] = 0.5  # feature 2: 1/10, last token (last sequence, last chunk row)
    acts[:, 3] = 2.0  # feature 3: always on, ties everywhere: first token of each sequence wins
    starts = np.array([0, 3, 6, 10])
    cache = ActivationCache.open(write_cache_from_arrays(tmp_path / "c", {0: acts}, seq_starts=starts,
                                                         chunk_tokens=4))
    eye = torch.eye(d)
    sae = load_sae(save_sae(tmp_path / "s", {"W_enc": eye, "W_dec": eye.clone(), "b_enc": torch.zeros(d),
                                             "b_dec": torch.zeros(d)},
                            {"architecture": "standard", "d_in": d, "d_sae": d, "hook_name": "blocks.0.hook_resid_post",
                             "hook_layer": 0}))
    top = collect_top_examples(sae, cache, top_n=2, block_tokens=3, distinct_window=None)  # every id is 0
    np.testing.assert_allclose(top.stats.density, [0.3, 0.0, 0.1, 1.0])
    np.testing.assert_allclose(top.stats.max_act, [5.0, 0.0, 0.5, 2.0])
    np.testing.assert_allclose(top.stats.mean_act, [0.8, 0.0, 0.05, 2.0])
    assert top.stats.n_tokens == 10
    assert top.token_index[0].tolist() == [4, 7] and top.seq_index[0].tolist() == [1, 2]
    assert top.values[0].tolist() == [5.0, 2.0]
    assert not (top.values[1] > 0).any()
    assert top.token_index[2][0] == 9 and top.values[2][1] <= 0  # second slot: no positive context
    assert sorted(top.token_index[3].tolist()) in ([0, 3], [0, 6], [3, 6])  # first token of its sequence
    assert sample_features(top, 10) == [0, 2, 3]  # live features only
    reports = feature_contexts(sae, cache, top, [0], window=1, render=TokenRenderer(None))
    ctx = reports[0]["contexts"][0]
    assert ctx["token_index"] == 4 and ctx["peak"] == 1 and ctx["acts"] == [0.0, 5.0, 0.0]
    assert ctx["position"] == 1 and ctx["tokens"] == ["<0>"] * 3
    ctx2 = reports[0]["contexts"][1]  # token 7 is position 1 of sequence 2 = [6, 10): window clipped at 6
    assert (ctx2["token_index"], ctx2["peak"], ctx2["acts"]) == (7, 1, [0.0, 2.0, 0.0])


@pytest.mark.slow
def test_contexts_render_tokens_and_window_acts(synthetic):
    sae_dir, cache_path, acts, starts = synthetic
    sae, cache = load_sae(sae_dir), ActivationCache.open(cache_path)
    top = collect_top_examples(sae, cache, top_n=3)
    k = int(np.argmax(top.values[:, 0]))
    (rep,) = feature_contexts(sae, cache, top, [k], window=4)
    ids = cache.token_ids()
    tok = cache.tokenizer()
    for ctx in rep["contexts"]:
        lo = ctx["token_index"] - ctx["peak"]
        assert ctx["token_ids"] == ids[lo:lo + len(ctx["token_ids"])].tolist()
        assert ctx["tokens"] == [tok.decode([i]) for i in ctx["token_ids"]]
        assert abs(ctx["acts"][ctx["peak"]] - ctx["max_act"]) < 1e-5
        assert max(ctx["acts"]) <= ctx["max_act"] + 1e-6
        seq = ctx["sequence"]
        assert starts[seq] <= lo and lo + len(ctx["tokens"]) <= starts[seq + 1]


@pytest.mark.slow
def test_top_examples_on_a_real_fast_cache(fast_cache, tmp_path):
    """The same exactness on activations harvested from the embedded model (layer 5, several chunk files)."""
    from tests.evaluate.interpret.conftest import make_sae

    cache = ActivationCache.open(fast_cache)
    sae = load_sae(make_sae(tmp_path / "sae", d_in=cache.d_model, d_sae=32, layer=5))
    acts = cache.read(5, 0, cache.n_tokens)
    with torch.no_grad():
        feats = sae.encode(torch.from_numpy(np.array(acts, dtype=np.float32))).numpy()
    top = collect_top_examples(sae, cache, top_n=5, block_tokens=300)
    # every conversation opens with the same system prompt: only its first copy may be an example
    eligible = first_copies(cache.token_ids(), cache.seq_starts(), 8)
    assert not eligible.all()
    expected = brute_force(feats, cache.seq_starts(), 5, eligible)
    for k in range(32):
        got = [(int(t), int(s)) for v, t, s in zip(top.values[k], top.token_index[k], top.seq_index[k]) if v > 0]
        assert got == [e[1:] for e in expected[k]], k
    np.testing.assert_allclose(top.stats.density, (feats > 0).mean(0))
    np.testing.assert_allclose(top.stats.max_act, feats.max(0), rtol=1e-6)


def test_a_shared_prefix_peak_gives_distinct_contexts(tmp_path):
    """Six conversations open with the same 20 tokens, where feature 0 peaks (as on the template's default
    system prompt of every FAST conversation): the five examples are five different contexts, the prefix one
    shown once, marked, with its six copies. (Before: five copies of the same window.)"""
    rng = np.random.default_rng(0)
    prefix = [1, 5, 198, *range(100, 115), 2, 198]
    n_seq, length = 6, 40
    ids = np.concatenate([prefix + rng.integers(1000, 2000, size=length - len(prefix)).tolist()
                          for _ in range(n_seq)])
    acts = np.zeros((n_seq * length, 2), np.float32)
    for s in range(n_seq):
        acts[s * length + 9, 0] = 9.0  # the peak, identical in every sequence's prefix
        acts[s * length + len(prefix):(s + 1) * length, 0] = rng.uniform(0.5, 5.0, size=length - len(prefix))
    starts = np.arange(0, n_seq * length + 1, length)
    cache = ActivationCache.open(write_cache_from_arrays(tmp_path / "c", {0: acts}, seq_starts=starts, token_ids=ids,
                                                         chunk_tokens=64))
    eye = torch.eye(2)
    sae = load_sae(save_sae(tmp_path / "s", {"W_enc": eye, "W_dec": eye.clone(), "b_enc": torch.zeros(2),
                                             "b_dec": torch.zeros(2)},
                            {"architecture": "standard", "d_in": 2, "d_sae": 2, "hook_name": "blocks.0.hook_resid_post",
                             "hook_layer": 0}))
    top = collect_top_examples(sae, cache, top_n=5, block_tokens=64)
    (rep,) = feature_contexts(sae, cache, top, [0], window=8, render=TokenRenderer(None))
    contexts = rep["contexts"]
    assert len(contexts) == 5
    assert len({(tuple(c["token_ids"]), c["peak"]) for c in contexts}) == 5  # five different windows
    assert len({tuple(ids[c["token_index"] - 8:c["token_index"] + 1]) for c in contexts}) == 5  # and histories
    first = contexts[0]
    assert (first["sequence"], first["position"], first["max_act"]) == (0, 9, 9.0)
    assert first["in_shared_prefix"] and first["copies"] == 6 and top.prefix_length == len(prefix)
    assert not any(c["in_shared_prefix"] for c in contexts[1:]) and all(c["copies"] == 1 for c in contexts[1:])
    assert [c["max_act"] for c in contexts[1:]] == sorted((c["max_act"] for c in contexts[1:]), reverse=True)
    assert "count once" in top.selection_rule() and "20-token prefix" in top.selection_rule()
    # statistics still count every copy
    assert top.stats.max_act[0] == 9.0 and top.stats.density[0] == pytest.approx(21 / length)
