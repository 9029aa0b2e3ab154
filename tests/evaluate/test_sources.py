"""Finding checkpoints, refusing mismatches, and the held-out eval-sequence rule."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.evaluate.errors import EvalError
from fast_sae.evaluate.sources import (
    check_against_cache,
    choose_eval_sequences,
    discover_sae_folders,
    load_entries,
    parse_aliases,
    parse_range,
)
from fast_sae.saeio import load_sae

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
    with pytest.raises(EvalError, match=r"l/cfg.json: hook_layer 7 not in cache .*'blocks.7.hook_resid_post'"):
        check_against_cache(wrong_layer, cache)
    wrong_d = load_entries([save_identity_sae(tmp_path / "d", 5, 1)])[0]
    with pytest.raises(EvalError, match="d/cfg.json: field 'd_in' 5 does not match d_model 3"):
        check_against_cache(wrong_d, cache)
    wrong_model = load_entries([save_identity_sae(tmp_path / "m", 3, 1, model_name="other")])[0]
    with pytest.raises(EvalError, match="trained on model 'other'"):
        check_against_cache(wrong_model, cache)
    check_against_cache(load_entries([save_identity_sae(tmp_path / "ok", 3, 1, model_name="m")])[0], cache)
    check_against_cache(load_entries([save_identity_sae(tmp_path / "org", 3, 1, model_name="Org/M")])[0], cache)


def test_model_aliases_say_two_ids_are_the_same_weights_with_a_warning(tmp_path, cache):
    other = load_entries([save_identity_sae(tmp_path / "m", 3, 1, model_name="org/other")])[0]
    with pytest.raises(EvalError, match=r"m/cfg.json: trained on model 'org/other' \(field 'model_name'\) but cache "
                                        r".* holds 'm'; if they are the same weights, say so with --model-alias "
                                        r"org/other=m$"):
        check_against_cache(other, cache)
    with pytest.raises(EvalError):
        check_against_cache(other, cache, aliases=[("org/other", "n")])  # an alias of other ids changes nothing
    for aliases in ([("org/other", "m")], [("M", "other")]):  # either way round, compared like model names
        assert check_against_cache(other, cache, aliases=aliases) == (
            f"SAEs trained on model 'org/other' scored on cache {cache.path} of model 'm': the same weights by "
            f"--model-alias {aliases[0][0]}={aliases[0][1]}")
    assert check_against_cache(load_entries([save_identity_sae(tmp_path / "ok", 3, 1, model_name="m")])[0],
                               cache) is None
    x = np.zeros((40, 3), np.float32)
    emb = "embedded:SmolLM2-135M-Instruct"
    embedded = ActivationCache.open(make_cache(tmp_path / "e", {1: x}, [4] * 10, model_id=emb))
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"):  # a SAELens release drops the org
        hub = load_entries([save_identity_sae(tmp_path / hub_id.replace("/", "_"), 3, 1, model_name=hub_id)])[0]
        assert check_against_cache(hub, embedded) == (
            f"SAEs trained on model {hub_id!r} scored on cache {embedded.path} of model {emb!r}: {emb!r} is "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct' de-quantised from GGUF Q4_1 (a built-in alias): the same model up "
            f"to 4-bit rounding of its weights, so activations and scores differ slightly from the hub model's")
    assert parse_aliases(" a/b = embedded:c ,,d=e") == [("a/b", "embedded:c"), ("d", "e")]
    assert parse_aliases("") == []
    for bad in ("a", "a=", "=b", "a=b,c"):
        with pytest.raises(EvalError, match=rf"^--model-alias '{bad}': expected SAE_MODEL=CACHE_MODEL"):
            parse_aliases(bad)


def test_entries_read_typed_fields(tmp_path):
    e = load_entries([save_identity_sae(tmp_path / "a", 3, 1, regime="bt-f", eval_sequence_range=[8, 10],
                                        model_name="m")])[0]
    assert (e.layer, e.architecture, e.d_in, e.d_sae, e.regime, e.model_name) == (1, "standard", 3, 6, "bt-f", "m")
    assert e.cfg.eval_sequence_ranges == [(8, 10)] and e.cfg_file == str(tmp_path / "a" / "cfg.json")
    assert e.describe()["hook_name"] == "blocks.1.hook_resid_post"
    plain = load_entries([save_constant_sae(tmp_path / "z", 3, 1)])[0]
    assert plain.regime == "unknown" and plain.cfg.eval_sequence_ranges is None
    assert parse_range("3:7") == (3, 7)
    with pytest.raises(EvalError):
        parse_range("3-7")


def test_sae_lens_specs_are_checked_before_loading(tmp_path, monkeypatch):
    from fast_sae.saeio import CheckpointError

    with pytest.raises(CheckpointError, match="sae_lens:only-a-release: expected sae_lens:RELEASE:SAE_ID"):
        load_entries(["sae_lens:only-a-release"])
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # as if sae-lens were not installed
    with pytest.raises(CheckpointError, match=r"sae_lens:rel:layer_2/x: needs the sae-lens package"):
        load_entries([save_identity_sae(tmp_path / "a", 3, 1), "sae_lens:rel:layer_2/x"], sae_lens_dir=tmp_path)
    assert [p.name for p in discover_sae_folders([tmp_path / "a", "sae_lens:rel:x"])] == ["a"]


def test_held_out_intersection_cap_and_cross_regime(tmp_path, cache):
    fast_a = load_entries([save_identity_sae(tmp_path / "a", 3, 1, regime="fast", eval_sequence_range=[5, 10])])[0]
    fast_b = load_entries([save_identity_sae(tmp_path / "b", 3, 1, regime="fast", eval_sequence_range=[7, 10])])[0]
    btp = load_entries([save_identity_sae(tmp_path / "p", 3, 1, regime="bt-p", eval_sequence_range=[0, 2])])[0]
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
    disjoint = load_entries([save_identity_sae(tmp_path / "x", 3, 1, regime="fast", eval_sequence_range=[0, 3])])[0]
    with pytest.raises(EvalError, match="do not overlap"):
        choose_eval_sequences([fast_a, disjoint], cache)
    # a recorded training-cache path overrides the regime guess, both ways
    other = load_entries([save_identity_sae(tmp_path / "o", 3, 1, regime="fast", eval_sequence_range=[5, 10],
                                            cache_path=str(tmp_path / "another"))])[0]
    assert len(choose_eval_sequences([other], cache).sequences) == 10
    same = load_entries([save_identity_sae(tmp_path / "s", 3, 1, regime="bt-p", eval_sequence_range=[5, 10],
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


# ---------------------------------------------------------------------- SAELens checkpoints and releases
HF_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _sae_lens_folder(folder, d_in, layer, seed=0, model_name="m", expansion=4):
    """A standard SAE saved by SAELens itself (its 6.x layout: hook name under metadata, no hook_layer)."""
    import torch
    from sae_lens.saes import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=expansion * d_in, metadata=SAEMetadata(
        model_name=model_name, hook_name=f"blocks.{layer}.hook_resid_post")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sae.save_model(folder)
    return folder


def _hub_snapshot(hub, repo_id, sae_id, checkpoint):
    """Lay ``checkpoint`` out the way huggingface_hub caches a downloaded repo (what a machine that once
    downloaded the release holds); SAELens' loader then finds it with the hub offline."""
    import shutil

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HF_REVISION)
    shutil.copytree(checkpoint, repo / "snapshots" / HF_REVISION / sae_id)


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline, its cache a fresh folder (no network here, and none needed)."""
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.mark.slow
def test_sae_lens_folder_and_release_are_scored(tmp_path, cache, offline_hub):
    """A folder SAELens saved, and a release through SAE.from_pretrained, load like our own checkpoints."""
    import torch
    from sae_lens import SAE

    folder = _sae_lens_folder(tmp_path / "theirs", 3, 1)
    assert "hook_layer" not in (folder / "cfg.json").read_text()
    _hub_snapshot(offline_hub, "local/saes", "res/L1", folder)
    store = tmp_path / "store"
    on_disk, released = load_entries([folder, "sae_lens:local/saes:res/L1"], sae_lens_dir=store)
    assert (on_disk.name, on_disk.layer, on_disk.regime, on_disk.model_name) == ("theirs", 1, "unknown", "m")
    assert released.name == "local/saes:res/L1" and released.source == "sae_lens:local/saes:res/L1"
    assert released.path == store / "local_saes" / "res_L1" and load_sae(released.path).cfg == released.cfg
    assert released.describe()["path"] == "sae_lens:local/saes:res/L1"
    x = torch.randn(20, 3)
    reference = SAE.load_from_disk(folder)
    for entry in (on_disk, released):
        assert torch.equal(entry.sae(x), reference(x))
    check_against_cache(on_disk, cache)
    wrong = load_entries([_sae_lens_folder(tmp_path / "wide", 5, 1)])[0]
    with pytest.raises(EvalError, match=r"wide/cfg.json: field 'd_in' 5 does not match d_model 3"):
        check_against_cache(wrong, cache)


@pytest.mark.slow
def test_unreachable_hub_and_unknown_release_are_one_line(tmp_path, offline_hub):
    from fast_sae.saeio import CheckpointError

    with pytest.raises(CheckpointError, match=r"^sae_lens:local/absent:x: SAELens could not load it \(is the Hugging "
                                              r"Face hub reachable\?\): LocalEntryNotFoundError: ") as err:
        load_entries(["sae_lens:local/absent:x"], sae_lens_dir=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"^sae_lens:no-such-release:x: SAELens could not load it .*ValueError: "
                                              r"Release no-such-release not found"):
        load_entries(["sae_lens:no-such-release:x"], sae_lens_dir=tmp_path)


@pytest.mark.slow
def test_pipeline_evaluate_scores_a_sae_lens_release(tmp_path):
    """`pipeline.py evaluate --sae sae_lens:RELEASE:ID` end to end, hub offline with the release cached."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    cache_path = make_cache(tmp_path / "c", {2: x}, [20] * 10, regime="fast", model_id="m")
    hub = tmp_path / "hub"
    _hub_snapshot(hub, "local/saes", "L2", _sae_lens_folder(tmp_path / "theirs", 8, 2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), FAST_SAE_HOME=str(tmp_path / "home"),
               OMP_NUM_THREADS="1")
    args = ["evaluate", "--sae", "sae_lens:local/saes:L2", "--sae", str(tmp_path / "theirs"), "--cache",
            str(cache_path), "--out", str(tmp_path / "o"), "--no-downstream", "--no-plots", "--no-progress"]
    proc = subprocess.run([sys.executable, "pipeline.py", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["local/saes:L2", "theirs"]
    assert rows[0]["path"] == "sae_lens:local/saes:L2" and rows[0]["layer"] == 2
    assert rows[0]["reconstruction"] == {**rows[1]["reconstruction"], "feature_frequency_file":
                                         rows[0]["reconstruction"]["feature_frequency_file"]}
    assert (tmp_path / "home" / "sae_lens" / "local_saes" / "L2" / "cfg.json").is_file()
    bad = subprocess.run([sys.executable, "pipeline.py", *args[:2], "sae_lens:local/saes", *args[3:]], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "Error: sae_lens:local/saes: expected sae_lens:RELEASE:SAE_ID (e.g. "
        "sae_lens:gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical)"]


@pytest.mark.slow
def test_a_sae_lens_sae_of_the_hub_model_scores_on_an_embedded_cache_with_a_warning(tmp_path, fast_cache):
    """SAELens-saved SAEs whose model_name is the hub id (built-in alias) or another id declared the same
    weights (--model-alias) are scored on a cache of the embedded model, each with a warning naming both
    ids; without the alias the other id is refused in one line."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cache = ActivationCache.open(fast_cache)
    assert cache.meta.model_id == "embedded:SmolLM2-135M-Instruct"
    hub = _sae_lens_folder(tmp_path / "hub", cache.d_model, 2, model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                           expansion=2)
    copy = _sae_lens_folder(tmp_path / "copy", cache.d_model, 2, seed=1, model_name="someone/smollm2-copy",
                            expansion=2)
    args = ["evaluate", "--sae", str(hub), "--cache", str(fast_cache), "--out", str(tmp_path / "o"),
            "--no-downstream", "--no-plots", "--no-progress", "--max-eval-tokens", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "pipeline.py", *args, "--sae", str(copy), "--model-alias",
                           "someone/smollm2-copy=embedded:SmolLM2-135M-Instruct"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["hub", "copy"]
    for r in report["rows"]:
        rec = r["reconstruction"]["subsets"]["all"]
        assert 0 < rec["n_tokens"] <= 1000 and rec["l0"] > 0 and np.isfinite(rec["mse"])
    dequantised = (f"warning: SAEs trained on model 'HuggingFaceTB/SmolLM2-135M-Instruct' scored on cache {fast_cache} "
                   f"of model 'embedded:SmolLM2-135M-Instruct': 'embedded:SmolLM2-135M-Instruct' is "
                   f"'HuggingFaceTB/SmolLM2-135M-Instruct' de-quantised from GGUF Q4_1 (a built-in alias)")
    declared = (f"warning: SAEs trained on model 'someone/smollm2-copy' scored on cache {fast_cache} of model "
                f"'embedded:SmolLM2-135M-Instruct': the same weights by --model-alias "
                f"someone/smollm2-copy=embedded:SmolLM2-135M-Instruct")
    lines = proc.stderr.splitlines()
    assert sum(line.startswith(dequantised) for line in lines) == 1, proc.stderr
    assert declared in lines, proc.stderr
    refused = subprocess.run([sys.executable, "pipeline.py", *args, "--sae", str(copy)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"Error: {copy / 'cfg.json'}: trained on model 'someone/smollm2-copy' (field 'model_name') but cache "
        f"{fast_cache} holds 'embedded:SmolLM2-135M-Instruct'; if they are the same weights, say so with "
        f"--model-alias someone/smollm2-copy=embedded:SmolLM2-135M-Instruct"]
