"""Downstream loss on the real embedded model: identity splice = clean, zeroing hurts, layers line up."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache
from fast_sae.evaluate.downstream import DownstreamConfig, downstream_sequences, evaluate_downstream
from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.sources import choose_eval_sequences, load_entries
from fast_sae.evaluate.token_filters import TokenFilters
from fast_sae.lm import EMBEDDED_MODEL

from .helpers import make_cache, save_constant_sae, save_identity_sae, save_random_sae

LAYER = 2
CFG = DownstreamConfig(max_sequences=2, max_tokens=200, progress=False, token_filters=False)


def _model_cache(path, model, tokenizer, shift: int = 1):
    """A real cache of two short chats; ``shift=0`` stores hidden_states[L] (the classic off-by-one)."""
    chats = [[{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris is the capital of France."}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    acts = []
    with torch.no_grad():
        for seq in ids:
            hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
            acts.append(hs[LAYER + shift][0].numpy())
    return make_cache(path, {LAYER: np.concatenate(acts)}, [len(s) for s in ids],
                      token_ids=np.concatenate(ids), model_id=EMBEDDED_MODEL, chunk_tokens=16)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory, embedded_model):
    model, tok = embedded_model
    return _model_cache(tmp_path_factory.mktemp("ds") / "cache", model, tok)


@pytest.mark.slow
def test_identity_splice_equals_clean_and_zero_is_worse(tmp_path, embedded_model, model_cache):
    model, _ = embedded_model
    d = model.config.hidden_size
    save_identity_sae(tmp_path / "run" / "identity", d, LAYER)
    save_random_sae(tmp_path / "run" / "random", d, 64, LAYER, seed=0)
    save_constant_sae(tmp_path / "run" / "zero", d, LAYER, 0.0)
    cache = ActivationCache.open(model_cache)
    entries = load_entries([tmp_path / "run"])
    sel = choose_eval_sequences(entries, cache)
    out = evaluate_downstream(model, {e.name: (e.sae, e.layer) for e in entries}, cache, sel, CFG)
    ident, zero, rnd = out["identity"], out["zero"], out["random"]
    assert ident.n_sequences == 2 and ident.n_tokens == sel.n_tokens - 2
    assert ident.spliced_loss == pytest.approx(ident.clean_loss, rel=1e-5)
    assert abs(ident.delta_loss_pct) < 1e-3 and ident.kl_spliced < 1e-6
    assert ident.loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert ident.zero_loss > ident.clean_loss + 0.5 and ident.kl_zero > 0.1
    # an SAE that outputs 0 everywhere is exactly zero ablation
    assert zero.spliced_loss == pytest.approx(zero.zero_loss, rel=1e-6)
    assert zero.loss_recovered == pytest.approx(0.0, abs=1e-5)
    assert rnd.spliced_loss != pytest.approx(rnd.clean_loss)
    assert ident.to_dict()["cache_match_rel_err"] < 1e-4
    d = ident.to_dict()
    assert d["delta_loss_pct"] == pytest.approx((d["spliced_loss"] - d["clean_loss"]) / d["clean_loss"] * 100)


@pytest.mark.slow
def test_token_filters_splice_only_kept_positions(tmp_path, embedded_model, model_cache):
    """no_pos0 / no_prefix: the sink (and the shared prefix) keep their clean activation."""
    model, _ = embedded_model
    d = model.config.hidden_size
    save_identity_sae(tmp_path / "run" / "identity", d, LAYER)
    save_constant_sae(tmp_path / "run" / "zero", d, LAYER, 0.0)
    cache = ActivationCache.open(model_cache)
    entries = load_entries([tmp_path / "run"])
    sel = choose_eval_sequences(entries, cache)
    lengths = np.diff(sel.seq_starts)[sel.sequences]
    cfg = DownstreamConfig(max_sequences=2, max_tokens=200, progress=False)
    filters = TokenFilters(seq_starts=sel.seq_starts, doc_starts=sel.seq_starts[:-1], prefix_length=5,
                           n_documents=len(sel.sequences))  # a 5-token shared prefix, whatever the tokens
    out = evaluate_downstream(model, {e.name: (e.sae, e.layer) for e in entries}, cache, sel, cfg, filters=filters)
    for filt, first in (("no_pos0", 1), ("no_prefix", 5)):
        ident, zero = out["identity"].filters[filt], out["zero"].filters[filt]
        assert ident.n_tokens == int((lengths - 1 - first).sum())  # predictions made at kept positions
        assert ident.spliced_loss == pytest.approx(ident.clean_loss, rel=1e-5)
        assert zero.spliced_loss == pytest.approx(zero.zero_loss, rel=1e-6) and zero.zero_loss > zero.clean_loss
        assert out["identity"].to_dict()["filters"][filt]["n_tokens"] == ident.n_tokens
    # keeping the sink clean changes the ablation: zeroing every position but 0 is not zeroing all
    assert out["zero"].filters["no_pos0"].zero_loss != pytest.approx(out["zero"].zero_loss, rel=1e-3)


@pytest.mark.slow
def test_off_by_one_cache_is_flagged(tmp_path, embedded_model):
    model, tok = embedded_model
    cache = ActivationCache.open(_model_cache(tmp_path / "shifted", model, tok, shift=0))
    sae = save_identity_sae(tmp_path / "id", model.config.hidden_size, LAYER)
    entries = load_entries([sae])
    out = evaluate_downstream(model, {"id": (entries[0].sae, LAYER)}, cache,
                              choose_eval_sequences(entries, cache),
                              DownstreamConfig(max_sequences=1, progress=False, token_filters=False))
    assert out["id"].to_dict()["cache_match_rel_err"] > 0.05


def test_downstream_sequences_respects_caps(tmp_path):
    x = np.ones((30, 2), np.float32)  # note: all-zero chunks are not written by the cache writer (see report)
    cache = ActivationCache.open(make_cache(tmp_path / "c", {0: x}, [1, 10, 10, 9]))
    sel = choose_eval_sequences([], cache)
    assert downstream_sequences(sel, DownstreamConfig(max_sequences=3, max_tokens=100)) == [(1, 11), (11, 21)]
    assert downstream_sequences(sel, DownstreamConfig(max_tokens=15)) == [(1, 11)]
    assert downstream_sequences(sel, DownstreamConfig(max_tokens=5, max_seq_len=4)) == [(1, 5)]
    one = choose_eval_sequences([], cache, explicit=(0, 1))  # a single one-token sequence
    assert downstream_sequences(one, DownstreamConfig()) == []
    with pytest.raises(EvalError, match="nothing to predict"):
        evaluate_downstream(None, {}, cache, one, DownstreamConfig(progress=False))
