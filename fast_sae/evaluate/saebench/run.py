"""Run SAEBench on the evaluated SAEs: write the worker's request, start it in .venv-saebench, read its results.

Why a subprocess in another venv: sae-bench pins numpy<2 and datasets<4 and drags a CUDA torchvision
(setup_saebench.sh); the two environments meet only through files: the checkpoint folders (SAELens
loads them unchanged), the model folder, a pretokenized dataset written here from the eval cache,
and SAEBench's own output JSON, which ``results`` reduces to the figures report and compare show.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache

from ..errors import EvalError
from ..sources import EvalSelection, SAEEntry
from .config import SAEBenchConfig
from .results import summarise

PACKAGE = Path(__file__).resolve().parents[2]  # fast_sae/: the worker imports it through a link (_package_path)
REQUEST = "request.json"
LOG = "worker.log"


def model_source(model_id: str) -> tuple[str, str]:
    """(local folder, short name) of the model the SAEs read; the short name is what SAEBench calls it."""
    from fast_sae.lm import EMBEDDED_HUB_ID, EMBEDDED_MODEL, ModelLoadError, local_checkpoint

    try:
        folder = local_checkpoint(model_id)
    except ModelLoadError as exc:
        raise EvalError(f"{exc} (SAEBench needs the model's files)") from None
    name = EMBEDDED_HUB_ID.split("/")[-1] if model_id == EMBEDDED_MODEL else model_id.rstrip("/").split("/")[-1]
    return str(folder), name


def write_core_rows(cache: ActivationCache, held_out: EvalSelection, folder: Path, context: int,
                    n_rows: int) -> dict[str, Any]:
    """The eval cache's held-out token ids as SAEBench core's dataset: rows of ``context`` tokens cut from the
    held-out sequences joined in stream order, each starting with the model's BOS (as SAEBench packs its
    openwebtext: the row's first position, an attention sink, is then a BOS, which SAEBench leaves out of
    its metrics; a cut-off token there would be a sink it scores), as a local JSON-lines dataset with an
    ``input_ids`` column (SAELens reads it as pretokenized)."""
    ids = cache.token_ids()
    stream = np.concatenate([ids[a:b] for a, b in held_out.token_runs()]) if len(held_out.sequences) else ids[:0]
    bos = cache.meta.bos_token_id
    head = [] if bos is None else [int(bos)]
    body = context - len(head)
    n = min(n_rows, len(stream) // body)
    if n < 1:
        raise EvalError(f"{cache.path}: {len(stream)} held-out tokens, fewer than one SAEBench core row of {context} "
                        f"(--saebench-core-context)")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "rows.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"input_ids": head + stream[i * body:(i + 1) * body].tolist()}) + "\n")
    return {"rows": n, "context": context, "tokens": n * context, "bos_first": bos, "held_out_tokens": int(len(stream)),
            "source": str(cache.path)}


def run_saebench(cfg: SAEBenchConfig, entries: list[SAEEntry], cache: ActivationCache, held_out: EvalSelection,
                 model_id: str, work: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every requested SAEBench eval on every SAE (one worker, the model loaded once); returns
    {"settings": ..., "per_sae": {name: {eval: summary}}, "warnings": [...]}."""
    py = cfg.venv_python()
    folder, name = model_source(model_id)
    work.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"evals": cfg.evals, "model": model_id, "model_folder": folder, "model_name": name,
                                "layers": sorted({e.layer for e in entries}), "layer_cut_off": True,
                                "device": cfg.device, "venv": str(py.parent.parent)}
    req: dict[str, Any] = {"work": str(work.resolve()), "model_folder": folder, "model_name": name,
                           "device": cfg.device, "evals": cfg.evals, "threads": _threads(),
                           "saes": [{"name": e.name, "release": f"sae{i}", "path": str(e.path.resolve())}
                                    for i, e in enumerate(entries)]}
    if "absorption" in cfg.evals:
        req["absorption"] = {"vocab_size": cfg.vocab_size, "seed": cfg.seed, "llm_batch_size": cfg.llm_batch_size,
                             "min_letters": cfg.min_letters, "k_sparse_probe_epochs": cfg.probe_epochs,
                             "max_k": cfg.max_k}
        settings["absorption"] = dict(req["absorption"])
    if "core" in cfg.evals:
        rows = cfg.core_batches * cfg.core_batch_prompts
        data = write_core_rows(cache, held_out, work / "core_data", cfg.core_context, rows)
        req["core"] = {"dataset": str((work / "core_data").resolve()), "context_size": cfg.core_context,
                       "n_batches": cfg.core_batches, "batch_prompts": cfg.core_batch_prompts}
        settings["core"] = {**req["core"], "data": data}
    if "sparse_probing_sae_probes" in cfg.evals:
        req["sae_probes"] = {"datasets": cfg.probe_datasets, "ks": cfg.probe_ks, "seed": cfg.seed}
        settings["sparse_probing_sae_probes"] = dict(req["sae_probes"])
    (work / REQUEST).write_text(json.dumps(req, indent=1))
    log(f"SAEBench ({', '.join(cfg.evals)}) on {len(entries)} SAE(s) in {py.parent.parent}; log: {work / LOG}")
    t0 = time.time()
    warnings: list[str] = []
    env = {**os.environ, "PYTHONPATH": _package_path(work), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    with open(work / LOG, "w") as logf:
        try:
            proc = subprocess.run([str(py), "-m", "fast_sae.evaluate.saebench.worker", str(work / REQUEST)],
                                  cwd=work, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=cfg.timeout_minutes * 60)
            if proc.returncode != 0:
                warnings.append(f"SAEBench worker exited with status {proc.returncode}; see {work / LOG}")
        except subprocess.TimeoutExpired:
            warnings.append(f"SAEBench worker stopped after --saebench-timeout-minutes {cfg.timeout_minutes:g}; "
                            f"evaluations it had not finished are missing (see {work / LOG})")
    settings["seconds"] = round(time.time() - t0, 1)
    per_sae, more = summarise(work, entries, cfg.evals)
    return {"settings": settings, "per_sae": per_sae, "warnings": warnings + more}


def _package_path(work: Path) -> str:
    """A folder holding only a link to this fast_sae package, for the worker's PYTHONPATH: the package's own
    parent may be the main environment's site-packages, whose numpy/datasets must not shadow the venv's."""
    folder = work / "pythonpath"
    folder.mkdir(exist_ok=True)
    link = folder / "fast_sae"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(PACKAGE, target_is_directory=True)
    return str(folder)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
