"""The SAEBench worker: runs SAEBench's own evaluations on this project's checkpoints, inside .venv-saebench.

Started by ``saebench.run`` as ``.venv-saebench/bin/python -m fast_sae.evaluate.saebench.worker REQUEST``
with PYTHONPATH holding only a link to the fast_sae package; it imports sae_bench, sae_lens,
transformer_lens and torch, and of fast_sae only this subpackage's ``tl_model`` (the main
environment's packages are not installed here).

What it changes in SAEBench's runs, at run time in this process only (no installed file is edited),
and why (docs/metrics.md, "SAEBench"):
- the model: the folder of the embedded model (or any Hugging Face folder), linked into the work
  folder under a short name and loaded through ``tl_model.local_folders``;
- the layer cut-off (``tl_model.stop_after_hooks``): cache-only forwards end after the SAE's layer;
- absorption: a seeded sample of SAEBench's alphabetic vocabulary (its probe, k-sparse probes and
  absorption pass all read it), and every artifact (probe, parquet files) in the work folder, never in
  the installed package, where SAEBench would otherwise keep a probe trained on another sample;
- core: the dataset is a local folder (the eval cache's held-out tokens, pretokenized rows);
- sparse_probing_sae_probes: a subset of the datasets shipped in the sae-probes wheel.
Every SAE loads with ``sae_lens.SAE.load_from_disk``; decoder rows are scaled to unit norm the way
SAEBench does for its pretrained SAEs (``fold_W_dec_norm``; for TopK only when every row has the same
norm, where the top-k choice cannot change), and the norms before folding are recorded.

Writes SAEBench's JSON files under ``WORK/<eval>/`` and ``WORK/worker_result.json``: per eval and SAE
the result file or why there is none, seconds, and the settings used.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .tl_model import local_folders, stop_after_hooks

RESULT_FILE = "worker_result.json"


def _load_sae(path: str, model_name: str, device: str) -> tuple[Any, dict[str, Any]]:
    """An SAELens SAE from a checkpoint folder, its model name set to the linked folder; decoder rows folded
    to unit norm where that keeps the SAE's outputs (see the module docstring)."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=device)
    sae.cfg.metadata.model_name = model_name
    if sae.cfg.metadata.prepend_bos is None:
        sae.cfg.metadata.prepend_bos = False
    norms = sae.W_dec.detach().norm(dim=1)
    facts: dict[str, Any] = {"decoder_norm_min": float(norms.min()), "decoder_norm_max": float(norms.max()),
                             "architecture": sae.cfg.architecture(), "d_sae": int(sae.cfg.d_sae),
                             "hook_name": sae.cfg.metadata.hook_name}
    uniform = float(norms.max() - norms.min()) <= 1e-4 * float(norms.max())
    try:
        if facts["architecture"] == "topk":
            if not uniform:
                raise NotImplementedError("TopK with unequal decoder norms")
            SAE.fold_W_dec_norm(sae)  # the base method: same factor for every latent keeps the top-k choice
        else:
            sae.fold_W_dec_norm()
        facts["decoder_folded"] = True
    except NotImplementedError as exc:
        facts["decoder_folded"] = False
        facts["decoder_not_folded_why"] = str(exc)
    return sae, facts


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _one_model_per_name() -> Iterator[None]:
    """Load each model once per worker: SAEBench's evals load theirs per call (~30 s each here)."""
    from transformer_lens import HookedTransformer

    original = HookedTransformer.from_pretrained_no_processing
    loaded: dict[tuple[str, str], Any] = {}

    def load(model_name: str, *args: Any, **kwargs: Any) -> Any:
        key = (model_name, str(kwargs.get("dtype")))
        if key not in loaded:
            loaded[key] = original(model_name, *args, **kwargs)
        return loaded[key]

    HookedTransformer.from_pretrained_no_processing = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        HookedTransformer.from_pretrained_no_processing = original  # type: ignore[method-assign]


def vocab_sample(words: list[str], size: int, seed: int, min_per_letter: int = 5) -> list[str]:
    """A seeded sample of about ``size`` of SAEBench's alphabetic words (0: all), stratified by first letter:
    each letter keeps its share, but at least ``min_per_letter`` words (or all it has). Why stratified:
    SAEBench trains one probe per letter on 80 % of the sample; a letter absent from it leaves a class
    without positives (NaN probe loss, then a KeyError in the k-sparse probes)."""
    if not size or size >= len(words):
        return list(words)
    by_letter: dict[str, list[str]] = {}
    for w in words:
        by_letter.setdefault(w.strip()[0].lower(), []).append(w)
    rng = random.Random(seed)
    out: list[str] = []
    for letter in sorted(by_letter):
        group = sorted(by_letter[letter])
        n = min(len(group), max(min_per_letter, round(size * len(group) / len(words))))
        out += rng.sample(group, n)
    return sorted(out)


def _sampled(original: Callable[..., list[str]], size: int, seed: int) -> Callable[..., list[str]]:
    """SAEBench's ``get_alpha_tokens`` limited to ``vocab_sample``."""

    def sample(*args: Any, **kwargs: Any) -> list[str]:
        return vocab_sample(original(*args, **kwargs), size, seed)

    return sample


def _absorption(req: dict[str, Any], saes: list[tuple[str, Any]], out: Path, work: Path, device: str) -> None:
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.main as absorption
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    s = req["absorption"]
    artifacts = work / "absorption_artifacts"
    probes = artifacts / "probes"
    cfg = AbsorptionEvalConfig(model_name=req["model_name"], random_seed=s["seed"], llm_batch_size=s["llm_batch_size"],
                               llm_dtype="float32", min_feats_for_eval=s["min_letters"],
                               k_sparse_probe_num_epochs=s["k_sparse_probe_epochs"], max_k_value=s["max_k"],
                               precalc_k_sparse_probe_sae_acts=True)
    sampled = _sampled(common.get_alpha_tokens, s["vocab_size"], s["seed"])
    k_sparse = partial(absorption.run_k_sparse_probing_experiment, probes_dir=probes,
                       experiment_dir=artifacts / "k_sparse_probing")
    absorb = partial(absorption.run_feature_absortion_experiment, probes_dir=probes,
                     experiment_dir=artifacts / "feature_absorption",
                     sparse_probing_experiment_dir=artifacts / "k_sparse_probing")
    random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    with _patched(common, "get_alpha_tokens", sampled), \
            _patched(feature_absorption, "get_alpha_tokens", sampled), \
            _patched(absorption, "run_k_sparse_probing_experiment", k_sparse), \
            _patched(absorption, "run_feature_absortion_experiment", absorb):
        for name, sae in saes:  # one call per SAE: SAEBench stops at the first SAE too few letters pass for
            absorption.run_eval(cfg, [(name, sae)], device, str(out), force_rerun=True)


def _core(req: dict[str, Any], saes: list[tuple[str, Any]], out: Path, device: str) -> None:
    """SAEBench's core eval on a local pretokenized folder. SAELens checks a pretokenized dataset's tokenizer
    by downloading its sae_lens.json from the hub, treating the path as a repo id (a local path fails there);
    the rows were written from a cache of this very model (evaluate checks the model id), so for a local
    folder that check is skipped; any other dataset goes through it."""
    import sae_bench.evals.core.main as core
    import sae_lens.training.activations_store as store

    original = store.validate_pretokenized_dataset_tokenizer

    def validate(dataset_path: str, model_tokenizer: Any) -> None:
        if not Path(dataset_path).is_dir():
            original(dataset_path, model_tokenizer)

    s = req["core"]
    with _patched(store, "validate_pretokenized_dataset_tokenizer", validate):
        _run_core(core, s, saes, out, device)


def _run_core(core: Any, s: dict[str, Any], saes: list[tuple[str, Any]], out: Path, device: str) -> None:
    core.multiple_evals(saes, n_eval_reconstruction_batches=s["n_batches"],
                        n_eval_sparsity_variance_batches=s["n_batches"], eval_batch_size_prompts=s["batch_prompts"],
                        compute_featurewise_density_statistics=True, compute_featurewise_weight_based_metrics=True,
                        exclude_special_tokens_from_reconstruction=False, dataset=s["dataset"],
                        context_size=s["context_size"], output_folder=str(out), dtype="float32", device=device,
                        force_rerun=True)


def _sae_probes(req: dict[str, Any], saes: list[tuple[str, Any]], out: Path, work: Path, device: str) -> None:
    import sae_bench.evals.sparse_probing_sae_probes.main as sp
    from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig

    s = req["sae_probes"]
    cfg = SparseProbingSaeProbesEvalConfig(model_name=req["model_name"], random_seed=s["seed"],
                                           dataset_names=list(s["datasets"]), ks=list(s["ks"]),
                                           results_path=str(work / "sae_probes_results"),
                                           model_cache_path=str(work / "sae_probes_model_acts"),
                                           include_llm_baseline=True)
    sp.run_eval(cfg, saes, device, str(out), force_rerun=True)


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Every requested eval on every SAE; one eval's failure is recorded and the others still run."""
    work = Path(req["work"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # SAEBench writes some artifacts relative to the working folder
    link = work / req["model_name"]
    if not link.exists():
        link.symlink_to(Path(req["model_folder"]).resolve(), target_is_directory=True)
    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    device = req["device"]
    result: dict[str, Any] = {"evals": {}, "saes": {}, "model_name": req["model_name"],
                              "model_folder": req["model_folder"], "versions": _versions()}
    with local_folders(), stop_after_hooks() as cut, _one_model_per_name():
        for ev in req["evals"]:
            t0 = time.time()
            out = work / ev
            out.mkdir(exist_ok=True)
            record: dict[str, Any] = {"saes": {}}
            saes = []
            for item in req["saes"]:
                sae, facts = _load_sae(item["path"], req["model_name"], device)
                result["saes"][item["name"]] = facts
                saes.append((item["release"], sae))
            try:
                if ev == "absorption":
                    _absorption(req, saes, out, work, device)
                elif ev == "core":
                    _core(req, saes, out, device)
                elif ev == "sparse_probing_sae_probes":
                    _sae_probes(req, saes, out, work, device)
                else:
                    raise ValueError(f"unknown SAEBench eval {ev!r}")
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                traceback.print_exc()
            for item in req["saes"]:
                f = out / f"{item['release']}_custom_sae_eval_results.json"
                record["saes"][item["name"]] = {"file": str(f)} if f.is_file() else {"file": None}
            record["seconds"] = round(time.time() - t0, 1)
            result["evals"][ev] = record
            result["cut_forwards"] = len(cut)
            (work / RESULT_FILE).write_text(json.dumps(result, indent=1))  # after each eval: a timeout keeps it
            print(f"saebench worker: {ev} done in {record['seconds']} s", flush=True)
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens", "sae-probes", "torch")}


def main(argv: list[str]) -> int:
    req = json.loads(Path(argv[0]).read_text())
    run(req)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
