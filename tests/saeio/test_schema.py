"""cfg.json <-> CheckpointConfig: every field round-trips; both layouts read; bad fields are named."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from fast_sae.saeio import (
    CacheIdentity,
    CheckpointConfig,
    CheckpointError,
    Normalization,
    TrainingData,
    TrainingRun,
    from_cfg_json,
    id_ranges,
    layer_of_hook,
    load_sae,
    resid_post_hook,
    to_cfg_json,
)

OLD = Path(__file__).parent / "data" / "fast_sae_0.2"  # checkpoints written by fast-sae 0.2 (flat layout)


def full_config(architecture: str = "batchtopk") -> CheckpointConfig:
    """Every field set to a value that differs from its default."""
    cache = CacheIdentity(path="/data/c", model="org/m", regime="bt-f", n_tokens=900, n_sequences=9,
                          context_size=100, dataset="org/chats", dataset_fingerprint="f" * 64,
                          chat_template_hash="c" * 64)
    return CheckpointConfig(
        architecture=architecture, d_in=8, d_sae=32, hook_name=resid_post_hook(11),
        k=16 if architecture in ("topk", "batchtopk") else None, apply_b_dec_to_input=True,
        model_name="org/m", model_revision="abc", context_size=100, dataset_path="org/chats", prepend_bos=True,
        weights_folded=False,
        normalization=Normalization(method="all", factor=0.25, requested="content", statistic="mean_sq_norm",
                                    layer=11, source=CacheIdentity(path="/data/fast", regime="fast")),
        training=TrainingData(cache=cache, train_token_range=(0, 800), eval_token_range=(800, 900),
                              eval_sequence_ranges=[(8, 9)], train_doc_ids=[(0, 5), (7, 12)], eval_doc_ids=[(12, 13)]),
        run=TrainingRun(**{"trainer": "t", "sae_name": "n", "training_tokens": 5, "lr": 0.5, "seed": 3,
                           "init_encoder_as_decoder_transpose": False, "batchtopk_threshold_lr": 0.1}),
        sae_lens_metadata={"neuronpedia_id": "x/y", "training_architecture_details": {"topk_threshold_lr": 0.1}})


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk"])
def test_every_field_round_trips_through_json(arch):
    cfg = full_config(arch)
    doc = json.loads(json.dumps(to_cfg_json(cfg)))
    assert from_cfg_json(doc, "x") == cfg
    # SAELens 6 layout: architecture fields on top, the rest under metadata, a version SAELens reads as 6.x
    assert doc["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert doc["metadata"]["training_architecture"] == arch and doc["metadata"]["sae_lens_version"] == "6.0.0"
    assert doc["metadata"]["hook_name"] == "blocks.11.hook_resid_post" and "hook_layer" not in doc
    assert doc["normalize_activations"] == "none" and doc["metadata"]["fast_sae"]["schema_version"] == 1
    assert ("k" in doc) == (arch == "topk")
    assert doc["metadata"].get("training_architecture_details") == (
        {"topk_threshold_lr": 0.1, "k": 16} if arch == "batchtopk" else {"topk_threshold_lr": 0.1})


def test_hook_names_and_id_ranges():
    assert resid_post_hook(3) == "blocks.3.hook_resid_post" and layer_of_hook("blocks.3.hook_resid_post") == 3
    assert layer_of_hook("blocks.3.hook_resid_pre") is None and layer_of_hook("blocks.x.hook_resid_post") is None
    assert id_ranges(np.array([5, 5, 6, 7, 2, 9, 10, 0], np.int32)) == [(0, 1), (2, 3), (5, 8), (9, 11)]
    assert id_ranges(np.array([], np.int32)) == []
    cfg = full_config()
    assert cfg.layer == 11 and cfg.regime == "bt-f" and cfg.training is not None and cfg.training.regime == "bt-f"
    assert CheckpointConfig("standard", 1, 2, resid_post_hook(0)).regime == "unknown"


def _doc() -> dict:
    return json.loads(json.dumps(to_cfg_json(full_config())))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("d_in"), "missing field 'd_in'"),
    (lambda d: d.update(d_sae="32"), "field 'd_sae' = '32', expected int"),
    (lambda d: d["metadata"].pop("hook_name"), "missing field 'metadata.hook_name'"),
    (lambda d: d["metadata"].update(hook_name="blocks.11.hook_resid_pre"), "hook_name 'blocks.11.hook_resid_pre' "
                                                                            "cannot be scored on activation caches"),
    (lambda d: d["metadata"].update(hook_head_index=2), "field 'metadata.hook_head_index' is 2"),
    (lambda d: d.update(normalize_activations="expected_average_only_in"),
     "field 'normalize_activations' is 'expected_average_only_in'"),
    (lambda d: d.update(reshape_activations="hook_z"), "field 'reshape_activations' is 'hook_z'"),
    (lambda d: d.update(architecture="gated"), "field 'architecture' is 'gated'"),
    (lambda d: d["metadata"]["training_architecture_details"].update(k=2.5),
     "field 'metadata.training_architecture_details.k' = 2.5, expected a whole number"),
    (lambda d: d["metadata"]["fast_sae"]["training"].update(eval_sequence_ranges=[[9, 8]]),
     r"field 'metadata.fast_sae.training.eval_sequence_ranges\[0\]' = \[9, 8\]: start after stop"),
    (lambda d: d["metadata"]["fast_sae"]["normalization"].pop("factor"),
     "missing field 'metadata.fast_sae.normalization.factor'"),
    (lambda d: d["metadata"]["fast_sae"]["training"]["cache"].update(n_tokens=1.5),
     "field 'metadata.fast_sae.training.cache.n_tokens' = 1.5, expected int"),
])
def test_bad_fields_are_named(edit, message):
    doc = _doc()
    edit(doc)
    with pytest.raises(CheckpointError, match=rf"^some/cfg.json: .*{message}"):
        from_cfg_json(doc, "some/cfg.json")


def test_unknown_fields_are_ignored_and_sae_lens_metadata_kept():
    doc = _doc()
    doc["metadata"]["fast_sae"]["training"]["from_the_future"] = 1
    doc["metadata"]["model_class_name"] = "HookedTransformer"
    cfg = from_cfg_json(copy.deepcopy(doc), "x")
    assert cfg.sae_lens_metadata["model_class_name"] == "HookedTransformer"
    assert to_cfg_json(cfg)["metadata"]["model_class_name"] == "HookedTransformer"


def test_pre_6_flat_layouts():
    """SAELens <= 5 wrote every field flat (v3 and older: hook_point, activation_fn_str)."""
    v5 = {"architecture": "standard", "d_in": 8, "d_sae": 16, "activation_fn_str": "topk",
          "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True, "hook_name": "blocks.2.hook_resid_post",
          "hook_layer": 2, "hook_head_index": None, "model_name": "gpt2", "context_size": 128,
          "dataset_path": "ds", "normalize_activations": "none", "neuronpedia_id": "gpt2/2-res",
          "sae_lens_training_version": "5.1.0", "dtype": "float32", "device": "cpu", "lr": "not ours to check"}
    cfg = from_cfg_json(v5, "x")
    assert (cfg.architecture, cfg.k, cfg.layer, cfg.model_name, cfg.context_size) == ("topk", 4, 2, "gpt2", 128)
    assert cfg.training is None and cfg.run is None and cfg.normalization is None
    assert cfg.sae_lens_metadata == {"neuronpedia_id": "gpt2/2-res", "sae_lens_training_version": "5.1.0"}
    v3 = {"d_in": 8, "d_sae": 16, "hook_point": "blocks.0.hook_resid_post", "hook_point_layer": 0,
          "hook_point_head_index": None, "activation_fn_str": "relu", "normalize_activations": False}
    cfg = from_cfg_json(v3, "x")
    assert (cfg.architecture, cfg.layer, cfg.apply_b_dec_to_input) == ("standard", 0, True)  # SAELens' defaults
    with pytest.raises(CheckpointError, match="x: field 'normalize_activations' is True"):
        from_cfg_json({**v3, "normalize_activations": True}, "x")
    with pytest.raises(CheckpointError, match="field 'hook_layer' 3 disagrees with hook_name"):
        from_cfg_json({**v5, "hook_layer": 3}, "x")
    with pytest.raises(CheckpointError, match="field 'activation_fn' is 'tanh-relu'"):
        from_cfg_json({**v3, "activation_fn_str": "tanh-relu"}, "x")


def test_fast_sae_0_2_checkpoints_keep_their_provenance():
    """Checkpoints written before the schema (flat layout) load with everything they recorded."""
    sae = load_sae(OLD / "L3_batchtopk_x2_k4")
    c = sae.cfg
    assert (c.architecture, c.k, c.layer, c.apply_b_dec_to_input, c.weights_folded) == ("batchtopk", 4, 3, True, True)
    assert c.normalization == Normalization(method="content", factor=1.0031733261561997)
    assert c.training is not None and c.run is not None
    assert c.training.cache == CacheIdentity(path="/tmp/slx/t0/cache", model="synthetic", regime="fast",
                                             n_tokens=6000, context_size=79, dataset="synthetic",
                                             dataset_fingerprint="")
    assert (c.training.train_token_range, c.training.eval_token_range) == ((0, 5443), (5443, 6000))
    assert c.training.eval_sequence_ranges == [(111, 121)] and c.training.train_doc_ids is None
    assert (c.run.trainer, c.run.training_tokens, c.run.train_batch_size_tokens) == ("fast-sae train", 2000, 100)
    assert c.run.batchtopk_threshold_lr == 0.01 and c.run.aux_k == 8
    topk = load_sae(OLD / "L3_topk_x2_k4").cfg
    assert topk.architecture == "topk" and topk.k == 4
    # written again, it is the SAELens 6 layout with the same facts
    again = from_cfg_json(json.loads(json.dumps(to_cfg_json(c))), "x")
    assert again == c


def test_the_writers_sae_lens_version_is_kept_and_the_layout_has_its_own_field():
    """metadata.sae_lens_version says which SAELens wrote the SAE; the layout version is recorded apart."""
    cfg = full_config()
    cfg.sae_lens_version = "6.54.12"  # read from a file SAELens 6.54.12 saved
    doc = json.loads(json.dumps(to_cfg_json(cfg)))
    assert doc["metadata"]["sae_lens_version"] == "6.54.12"
    assert doc["metadata"]["fast_sae"]["sae_lens_layout_version"] == "6.0.0"
    assert from_cfg_json(doc, "x") == cfg
    cfg.sae_lens_version = None  # no SAELens wrote it: the version SAELens needs is the layout's
    doc = json.loads(json.dumps(to_cfg_json(cfg)))
    assert doc["metadata"]["sae_lens_version"] == "6.0.0" and from_cfg_json(doc, "x").sae_lens_version is None
    del doc["metadata"]["fast_sae"]["sae_lens_layout_version"]  # written here before the field existed
    assert from_cfg_json(doc, "x").sae_lens_version is None
    cfg.sae_lens_version = "5.3.0"  # SAELens would read the file as pre-6.0: the layout version is written
    assert to_cfg_json(cfg)["metadata"]["sae_lens_version"] == "6.0.0"
    theirs = json.loads(json.dumps(to_cfg_json(full_config())))
    del theirs["metadata"]["fast_sae"]  # a file SAELens 6.0.0 wrote itself
    assert from_cfg_json(theirs, "x").sae_lens_version == "6.0.0"
    theirs["metadata"]["sae_lens_version"] = 6
    with pytest.raises(CheckpointError, match=r"^x: field 'metadata.sae_lens_version' = 6, expected a version string"):
        from_cfg_json(theirs, "x")
