"""Finding checkpoints, refusing mismatches, and the held-out eval-sequence rule."""
from __future__ import annotations

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.sources import (
    check_against_cache,
    choose_eval_sequences,
    discover_sae_folders,
    held_out_ranges,
    load_entries,
    parse_range,
)

from .helpers import make_cache, save_constant_sae, save_identity_sae


@pytest.fixture()
def cache(tmp_path):
    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    return ActivationCache.open(make_cache(tmp_path / "c", {1: x}, [4] * 10, regime="fast", model_id="m"))


def test_discovery_run_folder_and_errors(tmp_path):
    save_identity_sae(tmp_path / "run" / "b", 3, 1)
    save_identity_sae(tmp_path / "run" / "a", 3, 1)
    (tmp_path / "run" / "notes").mkdir()
    (tmp_path / "run" / "a.tmp-123").mkdir()
    (tmp_path / "run" / "a.tmp-123" / "cfg.json").write_text("{}")
    assert [p.name for p in discover_sae_folders([tmp_path / "run"])] == ["a", "b"]
    assert [p.name for p in discover_sae_folders([tmp_path / "run" / "a", tmp_path / "run"])] == ["a", "b"]
    with pytest.raises(EvalError, match="no such SAE"):
        discover_sae_folders([tmp_path / "missing"])
    with pytest.raises(EvalError, match="neither an SAE checkpoint"):
        discover_sae_folders([tmp_path / "run" / "notes"])
    save_identity_sae(tmp_path / "run2" / "a", 3, 1)
    names = [e.name for e in load_entries([tmp_path / "run", tmp_path / "run2"])]
    assert names == ["run/a", "b", "run2/a"]  # same folder names in two runs stay distinguishable


def test_mismatches_are_refused(tmp_path, cache):
    wrong_layer = load_entries([save_identity_sae(tmp_path / "l", 3, 7)])[0]
    with pytest.raises(EvalError, match="hook_layer 7 not in cache"):
        check_against_cache(wrong_layer, cache)
    wrong_d = load_entries([save_identity_sae(tmp_path / "d", 5, 1)])[0]
    with pytest.raises(EvalError, match="d_in 5 does not match d_model 3"):
        check_against_cache(wrong_d, cache)
    wrong_model = load_entries([save_identity_sae(tmp_path / "m", 3, 1, model_name="other")])[0]
    with pytest.raises(EvalError, match="trained on model 'other'"):
        check_against_cache(wrong_model, cache)
    check_against_cache(load_entries([save_identity_sae(tmp_path / "ok", 3, 1, model_name="m")])[0], cache)


def test_held_out_shapes():
    assert held_out_ranges({}) is None
    assert held_out_ranges({"eval_sequences": [8, 10]}) == [(8, 10)]
    assert held_out_ranges({"eval_sequences": {"start": 1, "stop": 3}}) == [(1, 3)]
    assert held_out_ranges({"eval_sequences": [[0, 2], [5, 6]]}) == [(0, 2), (5, 6)]
    assert held_out_ranges({"eval_sequence_range": [8, 10], "eval_sequences": 2}) == [(8, 10)]  # train's fields
    assert held_out_ranges({"eval_sequences": 2}) is None  # a count, not a range
    with pytest.raises(EvalError, match="cfg field eval_sequences: cannot read"):
        held_out_ranges({"eval_sequences": "8-10"})
    assert parse_range("3:7") == (3, 7)
    with pytest.raises(EvalError):
        parse_range("3-7")


def test_held_out_intersection_cap_and_cross_regime(tmp_path, cache):
    fast_a = load_entries([save_identity_sae(tmp_path / "a", 3, 1, regime="fast", eval_sequences=[5, 10])])[0]
    fast_b = load_entries([save_identity_sae(tmp_path / "b", 3, 1, regime="fast", eval_sequences=[7, 10])])[0]
    btp = load_entries([save_identity_sae(tmp_path / "p", 3, 1, regime="bt-p", eval_sequences=[0, 2])])[0]
    # the BT(P) SAE was not trained on this FAST cache: its held-out range does not restrict it
    assert list(choose_eval_sequences([btp], cache).sequences) == list(range(10))
    sel = choose_eval_sequences([fast_a, btp], cache)
    assert list(sel.sequences) == [5, 6, 7, 8, 9] and sel.n_tokens == 20
    assert sel.token_runs() == [(20, 40)]
    # two SAEs trained on this cache: only sequences held out from both
    assert list(choose_eval_sequences([fast_a, fast_b], cache).sequences) == [7, 8, 9]
    # token cap: whole sequences, at least one
    assert list(choose_eval_sequences([fast_a], cache, max_tokens=9).sequences) == [5, 6]
    assert list(choose_eval_sequences([fast_a], cache, max_tokens=1).sequences) == [5]
    assert list(choose_eval_sequences([fast_a], cache, explicit=(0, 2)).sequences) == [0, 1]
    with pytest.raises(EvalError, match="outside"):
        choose_eval_sequences([fast_a], cache, explicit=(5, 11))
    disjoint = load_entries([save_identity_sae(tmp_path / "x", 3, 1, regime="fast", eval_sequences=[0, 3])])[0]
    with pytest.raises(EvalError, match="do not overlap"):
        choose_eval_sequences([fast_a, disjoint], cache)
    # a recorded training-cache path overrides the regime guess, both ways
    other = load_entries([save_identity_sae(tmp_path / "o", 3, 1, regime="fast", eval_sequences=[5, 10],
                                            cache_path=str(tmp_path / "another"))])[0]
    assert len(choose_eval_sequences([other], cache).sequences) == 10
    same = load_entries([save_identity_sae(tmp_path / "s", 3, 1, regime="bt-p", eval_sequences=[5, 10],
                                           cache_path=str(cache.path))])[0]
    assert len(choose_eval_sequences([same], cache).sequences) == 5


def test_unknown_training_data_is_warned_about(tmp_path, cache):
    plain = load_entries([save_constant_sae(tmp_path / "z", 3, 1)])[0]
    sel = choose_eval_sequences([plain], cache)
    assert len(sel.sequences) == 10 and "may have been trained" in sel.warnings[0]
    # train with eval_sequences=0 records an empty range [n, n]: nothing held out, warned, not an error
    none_held = load_entries([save_identity_sae(tmp_path / "e", 3, 1, regime="fast", eval_sequence_range=[10, 10],
                                                cache_path=str(cache.path))])[0]
    sel = choose_eval_sequences([none_held], cache)
    assert len(sel.sequences) == 10 and "holds out no sequences" in sel.warnings[0]


def test_shared_fingerprint_of_another_regime_is_not_the_training_cache(tmp_path, cache):
    """FAST and BT(F) caches of the same chats share a dataset fingerprint but not their sequences."""
    from fast_sae.evaluate.sources import trained_on

    cache.meta.dataset_fingerprint = "abc"
    btf = load_entries([save_identity_sae(tmp_path / "f", 3, 1, regime="bt-f", dataset_fingerprint="abc",
                                          cache_path="/elsewhere/btf")])[0]
    fast = load_entries([save_identity_sae(tmp_path / "g", 3, 1, regime="fast", dataset_fingerprint="abc",
                                           cache_path="/moved/away", cache_n_tokens=40)])[0]
    other = load_entries([save_identity_sae(tmp_path / "h", 3, 1, regime="fast", dataset_fingerprint="xyz")])[0]
    assert not trained_on(btf, cache) and trained_on(fast, cache) and not trained_on(other, cache)
