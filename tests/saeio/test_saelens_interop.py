"""Two-way interoperability with the real SAELens library (sae-lens >= 6.54), every architecture.

- saved by SAELens (``save_model``; BatchTopK through ``save_inference_model``, as its trainer does)
  -> ``load_sae`` here -> the same features and reconstructions as SAELens' own loaded SAE;
- saved here (``save_sae``, and by the trainer) -> ``SAE.load_from_disk`` -> the same outputs;
- re-saved by SAELens -> loaded here -> every recorded fact intact; SAELens -> here -> SAELens keeps
  the writer's ``sae_lens_version``;
- SAELens' pre-6.0 layout (as SAELens 5 wrote it) read the same way SAELens 6 reads it;
- what cannot be scored on activation caches is refused in one line naming the file and field.

Importing sae_lens takes ~25 s, hence one module and the slow mark.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fast_sae.saeio import CheckpointConfig, CheckpointError, load_sae, resid_post_hook, save_sae
from tests.saeio.test_schema import full_config

pytestmark = pytest.mark.slow

D_IN, D_SAE, LAYER = 16, 48, 2
ARCHS = ["standard", "jumprelu", "topk", "batchtopk"]


@pytest.fixture(scope="module")
def sl() -> Any:
    """The sae_lens package (required: the point of these tests is the real library)."""
    warnings.filterwarnings("ignore", module="sae_lens")
    import sae_lens
    import sae_lens.saes

    assert tuple(int(p) for p in sae_lens.__version__.split(".")[:2]) >= (6, 54)
    return sae_lens


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1000, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights with some features firing: every parameter random, thresholds positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.2)
            p.copy_(values.abs() if "threshold" in name else values)


def _metadata(sl: Any, **extra: Any) -> Any:
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(model_name="synthetic", hook_name=resid_post_hook(LAYER), context_size=64,
                       dataset_path="some/chats", neuronpedia_id="synthetic/2-res", **extra)


def save_with_sae_lens(sl: Any, arch: str, folder: Path, seed: int = 0, **cfg_kw: Any) -> Path:
    """Save an SAE of ``arch`` the way SAELens does; BatchTopK through its training class, like its trainer."""
    s = sl.saes
    if arch == "batchtopk":
        sae = s.BatchTopKTrainingSAE(s.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6,
                                                                  metadata=_metadata(sl), **cfg_kw))
        _randomise(sae, seed)
        sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
        sae.save_inference_model(folder)
        return folder
    cls, cfg_cls, kw = {"standard": (s.StandardSAE, s.StandardSAEConfig, {}),
                        "jumprelu": (s.JumpReLUSAE, s.JumpReLUSAEConfig, {}),
                        "topk": (s.TopKSAE, s.TopKSAEConfig, {"k": 6})}[arch]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=_metadata(sl), **kw, **cfg_kw))
    _randomise(sae, seed)
    sae.save_model(folder)
    return folder


def assert_same_outputs(theirs: Any, ours: Any, x: torch.Tensor, exact: bool = True) -> None:
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        r_theirs, r_ours = theirs(x), ours(x)
    assert 0 < (f_ours > 0).float().mean() < 0.9  # a meaningful test: some features fire, not all
    if exact:
        assert torch.equal(f_theirs, f_ours) and torch.equal(r_theirs, r_ours)
    else:
        torch.testing.assert_close(f_ours, f_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_ours, r_theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saved_by_sae_lens_loads_here(sl, x, tmp_path, arch, apply_b_dec):
    folder = save_with_sae_lens(sl, arch, tmp_path / arch, apply_b_dec_to_input=apply_b_dec)
    ours = load_sae(folder)
    assert (ours.architecture, ours.layer, ours.d_in, ours.d_sae) == (arch, LAYER, D_IN, D_SAE)
    assert ours.cfg.k == (6 if arch in ("topk", "batchtopk") else None)
    assert ours.cfg.apply_b_dec_to_input is apply_b_dec and ours.cfg.model_name == "synthetic"
    assert (ours.cfg.context_size, ours.cfg.dataset_path) == (64, "some/chats")
    assert ours.cfg.sae_lens_metadata["neuronpedia_id"] == "synthetic/2-res"
    theirs = sl.SAE.load_from_disk(folder)
    assert_same_outputs(theirs, ours, x)
    if arch == "batchtopk":  # SAELens' BatchTopK training details survive a save from here
        save_sae(tmp_path / "again", ours.weights(), ours.cfg)
        meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
        assert meta["training_architecture_details"]["topk_threshold_lr"] == 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_to_here_to_sae_lens_keeps_the_writers_version(sl, x, tmp_path, arch):
    """SAELens -> load_sae/save_sae here -> SAELens: metadata.sae_lens_version stays the writer's."""
    folder = save_with_sae_lens(sl, arch, tmp_path / "theirs")
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["sae_lens_version"] == sl.__version__
    ours = load_sae(folder)
    assert ours.cfg.sae_lens_version == sl.__version__
    save_sae(tmp_path / "ours", ours.weights(), ours.cfg)
    meta = json.loads((tmp_path / "ours" / "cfg.json").read_text())["metadata"]
    assert meta["sae_lens_version"] == sl.__version__ and meta["fast_sae"]["sae_lens_layout_version"] == "6.0.0"
    theirs = sl.SAE.load_from_disk(tmp_path / "ours")
    assert theirs.cfg.metadata.sae_lens_version == sl.__version__
    assert_same_outputs(theirs, ours, x)
    theirs.save_model(tmp_path / "back")
    meta = json.loads((tmp_path / "back" / "cfg.json").read_text())["metadata"]
    assert meta["sae_lens_version"] == sl.__version__ and meta["fast_sae"]["sae_lens_layout_version"] == "6.0.0"
    assert load_sae(tmp_path / "back").cfg == ours.cfg


def test_sae_lens_topk_with_decoder_norm_rescaling_is_folded(sl, x, tmp_path):
    folder = save_with_sae_lens(sl, "topk", tmp_path / "t", rescale_acts_by_decoder_norm=True)
    ours = load_sae(folder)
    theirs = sl.SAE.load_from_disk(folder)
    assert theirs.cfg.rescale_acts_by_decoder_norm and not ours.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert_same_outputs(theirs, ours, x, exact=False)  # folded: equal up to float rounding


def _our_checkpoint(arch: str, folder: Path, seed: int = 3) -> tuple[Path, CheckpointConfig]:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3, "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
         "b_enc": torch.randn(D_SAE, generator=g) * 0.2, "b_dec": torch.randn(D_IN, generator=g) * 0.2}
    if arch in ("jumprelu", "batchtopk"):
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.4
    cfg = full_config(arch)
    cfg.d_in, cfg.d_sae, cfg.hook_name, cfg.weights_folded = D_IN, D_SAE, resid_post_hook(LAYER), True
    return save_sae(folder, w, cfg), cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_here_loads_in_sae_lens_and_survives_its_resave(sl, x, tmp_path, arch):
    folder, cfg = _our_checkpoint(arch, tmp_path / "ours")
    theirs = sl.SAE.load_from_disk(folder)
    expected = {"standard": "StandardSAE", "jumprelu": "JumpReLUSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE"}
    assert type(theirs).__name__ == expected[arch]
    assert theirs.cfg.metadata.hook_name == resid_post_hook(LAYER) and theirs.cfg.normalize_activations == "none"
    assert_same_outputs(theirs, load_sae(folder), x)
    theirs.save_model(tmp_path / "resaved")
    back = load_sae(tmp_path / "resaved")
    assert back.cfg == cfg  # normalisation factor and source, regime, fingerprint, eval ranges, doc ids, run ...
    assert back.architecture == arch
    assert_same_outputs(theirs, back, x)


def test_trained_checkpoints_load_in_sae_lens(sl, x, tmp_path):
    """What the trainer writes (folded weights, full provenance) runs identically in SAELens."""
    from fast_sae.actcache.from_arrays import write_cache_from_arrays
    from fast_sae.train.config import GridConfig, TrainConfig
    from fast_sae.train.trainer import Trainer

    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((3000, D_IN)) * 3 + 1).astype(np.float32)
    cache = write_cache_from_arrays(tmp_path / "cache", {LAYER: acts}, seq_starts=np.arange(0, 3001, 50),
                                    chunk_tokens=500)  # one document per sequence
    grid = GridConfig(layers=[LAYER], architectures=ARCHS, expansion_factors=[3],
                      l1_coefficients=[0.1], l0_coefficients=[0.01], k=[6])
    cfg = TrainConfig(tokens=1500, batch_tokens=100, eval_sequences=10, buffer_tokens=500, lr=1e-3,
                      jumprelu_init_threshold=0.01)
    Trainer(cache, tmp_path / "run", cfg, grid, echo=lambda _m: None, progress=False).run()
    for spec in grid.specs():
        folder = tmp_path / "run" / spec.name
        ours = load_sae(folder)
        assert ours.architecture == spec.architecture
        t = ours.cfg.training
        assert t is not None and t.train_doc_ids == [(0, 50)] and t.eval_doc_ids == [(50, 60)]
        assert t.eval_sequence_ranges == [(50, 60)] and t.train_token_range == (0, 2500)
        theirs = sl.SAE.load_from_disk(folder)
        with torch.no_grad():
            assert torch.equal(theirs.encode(x), ours.encode(x)) and torch.equal(theirs(x), ours(x))
        theirs.save_model(tmp_path / "resaved" / spec.name)
        assert load_sae(tmp_path / "resaved" / spec.name).cfg == ours.cfg


def _pre_6(arch: str, folder: Path) -> Path:
    """A checkpoint as SAELens 5 wrote it: flat cfg.json, hook_point names of v3 for the standard one."""
    g = torch.Generator().manual_seed(7)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3, "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
         "b_enc": torch.randn(D_SAE, generator=g) * 0.2, "b_dec": torch.randn(D_IN, generator=g) * 0.2}
    cfg: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "context_size": 128,
                           "model_name": "synthetic", "dataset_path": "ds", "prepend_bos": True,
                           "normalize_activations": "none", "apply_b_dec_to_input": True,
                           "finetuning_scaling_factor": False, "sae_lens_training_version": "5.3.0"}
    if arch == "standard":  # SAELens 3 names
        cfg |= {"hook_point": resid_post_hook(LAYER), "hook_point_layer": LAYER, "hook_point_head_index": None,
                "activation_fn_str": "relu"}
    else:
        cfg |= {"architecture": "jumprelu" if arch == "jumprelu" else "standard", "hook_name": resid_post_hook(LAYER),
                "hook_layer": LAYER, "hook_head_index": None,
                "activation_fn_str": "topk" if arch == "topk" else "relu",
                "activation_fn_kwargs": {"k": 6} if arch == "topk" else {}}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.4
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_pre_6_layout_loads_like_sae_lens_reads_it(sl, x, tmp_path, arch):
    folder = _pre_6(arch, tmp_path / arch)
    theirs, ours = sl.SAE.load_from_disk(folder), load_sae(folder)
    assert ours.architecture == arch and ours.layer == LAYER and ours.cfg.apply_b_dec_to_input
    assert ours.cfg.sae_lens_metadata["sae_lens_training_version"] == "5.3.0"
    assert_same_outputs(theirs, ours, x)


def test_unscorable_sae_lens_checkpoints_are_refused_in_one_line(sl, tmp_path):
    s = sl.saes
    gated = s.GatedSAE(s.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata(sl)))
    gated.save_model(tmp_path / "gated")
    pre = s.StandardSAE(s.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata(sl)))
    pre.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    pre.save_model(tmp_path / "pre")
    scaled = s.StandardSAE(s.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata(sl),
                                               normalize_activations="expected_average_only_in"))
    scaled.save_model(tmp_path / "scaled")
    training = s.BatchTopKTrainingSAE(s.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, metadata=_metadata(sl)))
    training.save_model(tmp_path / "batchtopk_training")
    for name, message in [
        ("batchtopk_training", r"field 'architecture' is 'batchtopk': a SAELens BatchTopK training checkpoint "
                               r"\(BatchTopKTrainingSAE.save_model\); save it with SAELens's save_inference_model "
                               r"instead \(a JumpReLU SAE with the learned threshold, as its trainer does\), which "
                               r"loads here as batchtopk$"),
        ("gated", r"field 'architecture' is 'gated'; SAELens architectures scored here: jumprelu, standard, topk$"),
        ("pre", r"hook_name 'blocks.2.hook_resid_pre' cannot be scored on activation caches"),
        ("scaled", r"field 'normalize_activations' is 'expected_average_only_in'"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name / 'cfg.json'}: {message}") as err:
            load_sae(tmp_path / name)
        assert "\n" not in str(err.value)
