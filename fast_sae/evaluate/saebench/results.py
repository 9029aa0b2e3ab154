"""SAEBench's output JSON reduced to the figures report.json carries per SAE.

Why a reduction: SAEBench writes one large JSON per eval and SAE (core adds a record per latent);
a report row keeps the headline metrics, the counts they rest on and the path of the full file.
Reads only files (the worker's ``worker_result.json`` and SAEBench's outputs), never imports SAEBench.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..sources import SAEEntry

RESULT_FILE = "worker_result.json"  # = worker.RESULT_FILE (the worker runs in the other venv)

CORE_METRICS = {  # report key -> SAEBench's eval_result_metrics path
    "l0": "sparsity.l0", "explained_variance": "reconstruction_quality.explained_variance",
    "mse": "reconstruction_quality.mse", "cossim": "reconstruction_quality.cossim",
    "ce_loss_score": "model_performance_preservation.ce_loss_score",
    "ce_loss_with_sae": "model_performance_preservation.ce_loss_with_sae",
    "ce_loss_without_sae": "model_performance_preservation.ce_loss_without_sae",
    "ce_loss_with_ablation": "model_performance_preservation.ce_loss_with_ablation",
    "kl_div_score": "model_behavior_preservation.kl_div_score", "l2_ratio": "shrinkage.l2_ratio",
    "frac_alive": "misc_metrics.frac_alive",
    "tokens_reconstruction": "token_stats.total_tokens_eval_reconstruction",
    "tokens_sparsity": "token_stats.total_tokens_eval_sparsity_variance",
}


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def absorption_summary(doc: dict[str, Any], probe_f1: dict[str, float] | None = None) -> dict[str, Any]:
    """Mean absorption over the letters that passed SAEBench's probe check, with the letters themselves."""
    mean = _get(doc, "eval_result_metrics.mean") or {}
    details = doc.get("eval_result_details") or []
    out = {"mean_absorption_fraction": mean.get("mean_absorption_fraction_score"),
           "mean_full_absorption": mean.get("mean_full_absorption_score"),
           "mean_num_split_features": mean.get("mean_num_split_features"),
           "sd_absorption_fraction": mean.get("std_dev_absorption_fraction_score"),
           "sd_full_absorption": mean.get("std_dev_full_absorption_score"),
           "letters": [d.get("first_letter") for d in details], "n_letters": len(details),
           "probe_true_positives": sum(int(d.get("num_probe_true_positives") or 0) for d in details)}
    if probe_f1 is not None:
        out["probe_f1"] = probe_f1
    return out


def _probe_f1(work: Path, release: str) -> dict[str, float] | None:
    """Per letter, the residual probe's F1 on the test words (SAEBench's k-sparse probing artifact)."""
    f = work / "artifacts" / "absorption" / f"{release}_custom_sae_k_sparse_probing.json"
    try:
        rows = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return {r["letter"]: round(float(r["f1_probe"]), 4) for r in rows if isinstance(r, dict) and "letter" in r}


def core_summary(doc: dict[str, Any]) -> dict[str, Any]:
    metrics = doc.get("eval_result_metrics") or {}
    return {key: _get(metrics, path) for key, path in CORE_METRICS.items()}


def sae_probes_summary(doc: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    """Mean test accuracy over the datasets per k, the dense (residual) baseline, and per dataset."""
    m = doc.get("eval_result_metrics") or {}
    per_ds = {d.get("dataset_name"): {"llm": d.get("llm_test_accuracy"),
                                      **{str(k): d.get(f"sae_top_{k}_test_accuracy") for k in ks}}
              for d in doc.get("eval_result_details") or []}
    return {"k": {str(k): _get(m, f"sae.sae_top_{k}_test_accuracy") for k in ks},
            "llm_test_accuracy": _get(m, "llm.llm_test_accuracy"), "datasets": per_ds, "n_datasets": len(per_ds)}


def summarise(work: Path, entries: list[SAEEntry], evals: list[str],
              ks: list[int] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per SAE name, per eval: the summary, or {"error": why there is none}; and warnings."""
    status = _read(work / RESULT_FILE) or {}
    warnings: list[str] = []
    per_sae: dict[str, dict[str, Any]] = {e.name: {} for e in entries}
    for ev in evals:
        rec = (status.get("evals") or {}).get(ev)
        if rec is None:
            warnings.append(f"SAEBench {ev}: the worker did not finish it (see {work / 'worker.log'})")
        for i, e in enumerate(entries):
            release = f"sae{i}"
            f = work / ev / f"{release}_custom_sae_eval_results.json"
            doc = _read(f)
            facts = (status.get("saes") or {}).get(e.name) or {}
            if doc is None:
                why = ("not run: the worker stopped before it" if rec is None else
                       rec.get("error") or "no result file (SAEBench logged why in worker.log)")
                if ev == "absorption":
                    f1 = _probe_f1(work, release)
                    if f1 is not None:
                        passed = sum(v > 0.6 for v in f1.values())
                        why = (f"{passed} of {len(f1)} letters passed the probe check (F1 > 0.6), fewer than "
                               f"--saebench-min-letters")
                        per_sae[e.name][ev] = {"error": why, "probe_f1": f1}
                        continue
                per_sae[e.name][ev] = {"error": why}
                continue
            if ev == "absorption":
                summary = absorption_summary(doc, _probe_f1(work, release))
            elif ev == "core":
                summary = core_summary(doc)
            else:
                k_list = ks or [int(k) for k in (_get(doc, "eval_config.ks") or [1, 2, 5])]
                summary = sae_probes_summary(doc, k_list)
            per_sae[e.name][ev] = summary | {"file": str(f), "sae": facts}
    return per_sae, warnings
