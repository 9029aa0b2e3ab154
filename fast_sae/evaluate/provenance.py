"""What each SAE was trained on, read from its cfg.json, and the held-out check of an evaluation.

Why one accessor: the train stage records the dataset of its training cache, the documents of its
training tokens (doc ids, i.e. dataset indices, as [start, stop) ranges) and its normalisation
constant with the constant's source; evaluate reads those facts only through ``training_facts``,
so the field names live in one place here.

The held-out rule (``check_overlap``): an SAE must not be scored on documents it was trained on.
For every SAE and eval cache of the same dataset (name, split, config), the eval documents are
the doc ids of the selected eval tokens; any of them inside the SAE's training documents is an
overlap, for every regime alike (BT(F) packs the same conversations as FAST into blocks). An SAE
that records no training documents cannot be checked and gets a warning; one trained on another
dataset (BT(P) on text) cannot overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import to_plain

from .sources import EvalSelection, SAEEntry


@dataclass
class TrainingFacts:
    """The cfg.json facts of one SAE that the evaluation needs (None: not recorded)."""

    regime: str
    dataset: dict[str, Any] | None  # name, split, config, fingerprint, docs, holdout_fraction, holdout_seed
    train_doc_ranges: list[tuple[int, int]] | None
    normalization: dict[str, Any] | None  # method, factor, source, statistic, ...


def training_facts(entry: SAEEntry) -> TrainingFacts:
    """The training provenance recorded in an SAE's cfg (see the module docstring)."""
    cfg = entry.cfg
    ds: dict[str, Any] | None = None
    ranges: list[tuple[int, int]] | None = None
    if cfg.training is not None:
        c = cfg.training.cache
        ds = {"name": c.dataset, "split": c.dataset_split, "config": c.dataset_config,
              "fingerprint": c.dataset_fingerprint, "docs": c.docs, "holdout_fraction": c.holdout_fraction,
              "holdout_seed": c.holdout_seed}
        if cfg.training.train_doc_ids is not None:
            ranges = [(int(a), int(b)) for a, b in cfg.training.train_doc_ids]
    if (ds is None or ds["name"] is None) and cfg.dataset_path:
        ds = {"name": cfg.dataset_path}
    norm = to_plain(cfg.normalization) if cfg.normalization is not None else None
    if norm is not None:  # the source cache by its path: one hashable fact per constant
        norm["source"] = (norm.get("source") or {}).get("path")
    return TrainingFacts(regime=entry.regime, dataset=ds if ds and ds.get("name") else None,
                         train_doc_ranges=ranges, normalization=norm)


def cache_dataset(cache: ActivationCache) -> dict[str, Any]:
    """The dataset identity of a cache, in the shape ``TrainingFacts.dataset`` has."""
    docs = cache.meta.document_set()
    return {"name": cache.meta.dataset, "split": docs["dataset_split"], "config": docs["dataset_config"],
            "fingerprint": cache.meta.dataset_fingerprint, "docs": docs["docs"],
            "holdout_fraction": docs["holdout_fraction"], "holdout_seed": docs["holdout_seed"]}


def same_dataset(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same name, and the same split and config where both record one (doc ids then mean the same samples)."""
    if a.get("name") != b.get("name"):
        return False
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in ("split", "config"))


def docs_in_ranges(docs: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Boolean mask: which of ``docs`` fall inside the sorted, disjoint [start, stop) ``ranges``."""
    if not ranges:
        return np.zeros(len(docs), dtype=bool)
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    stops = np.array([b for _, b in ranges], dtype=np.int64)
    i = np.searchsorted(starts, docs, side="right") - 1
    return (i >= 0) & (docs < stops[np.clip(i, 0, None)])


def eval_documents(cache: ActivationCache, selection: EvalSelection) -> np.ndarray:
    """The distinct doc ids of the selected eval tokens."""
    doc_ids = cache.doc_ids()
    runs = selection.token_runs()
    return np.unique(np.concatenate([doc_ids[a:b] for a, b in runs]).astype(np.int64)) if runs else np.zeros(0, int)


def check_overlap(entry: SAEEntry, cache: ActivationCache, docs: np.ndarray) -> dict[str, Any]:
    """Whether ``entry`` was trained on any of the eval documents ``docs`` of ``cache``.

    Returns ``{status, n_eval_docs, n_trained_on, note}`` with status ``disjoint``, ``other dataset``,
    ``overlap`` or ``unknown`` (nothing recorded to decide).
    """
    facts = training_facts(entry)
    eval_ds = cache_dataset(cache)
    out: dict[str, Any] = {"n_eval_docs": int(len(docs)), "n_trained_on": None,
                           "eval_dataset": eval_ds["name"], "training_dataset": (facts.dataset or {}).get("name")}
    if facts.dataset is None:
        return out | {"status": "unknown", "note": "the checkpoint records no training dataset"}
    if not same_dataset(facts.dataset, eval_ds):
        return out | {"status": "other dataset", "note": f"trained on {facts.dataset.get('name')!r}, "
                                                          f"evaluated on {eval_ds['name']!r}"}
    if facts.train_doc_ranges is None:
        return out | {"status": "unknown", "note": "the checkpoint records no training documents"}
    hit = docs_in_ranges(docs, facts.train_doc_ranges)
    n = int(hit.sum())
    out["n_trained_on"] = n
    if n:
        return out | {"status": "overlap", "note": f"trained on {n} of the {len(docs)} eval documents "
                                                   f"(e.g. doc ids {docs[hit][:5].tolist()})"}
    return out | {"status": "disjoint", "note": f"none of its training documents is among the {len(docs)} eval "
                                                f"documents"}
