"""What an SAE was trained on, for its cfg.json: dataset, documents, normalisation.

Why: an evaluation must be able to prove that its held-out documents were never trained on (by
any regime) and that the regimes it compares were scaled alike. So every checkpoint records the
dataset identity of its training cache (name, split, config, which document set the harvest
took), the documents of its training and held-out token ranges as compact [start, stop) ranges of
doc ids (doc ids are dataset indices: caches of the same dataset share them), and the
normalisation constant with its source. The evaluate stage reads these fields back.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache

from .normalize import Normalization


def id_ranges(ids: np.ndarray) -> list[list[int]]:
    """The distinct values of an integer array as sorted, disjoint [start, stop) ranges."""
    u = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(u):
        return []
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    starts = u[np.concatenate([[0], breaks])]
    stops = u[np.concatenate([breaks - 1, [len(u) - 1]])] + 1
    return [[int(a), int(b)] for a, b in zip(starts.tolist(), stops.tolist())]


def dataset_identity(cache: ActivationCache) -> dict[str, Any]:
    """Which dataset (and which of its documents) a cache was harvested from."""
    m = cache.meta
    args = m.harvest_args or {}
    return {"name": m.dataset, "split": args.get("dataset_split"), "config": args.get("dataset_config"),
            "fingerprint": m.dataset_fingerprint, "docs": args.get("docs", "all"),
            "holdout_fraction": args.get("holdout_fraction"), "holdout_seed": args.get("holdout_seed")}


def training_record(cache: ActivationCache, train_tokens: int, norm: Normalization) -> dict[str, Any]:
    """The cfg.json fields of provenance (see the module docstring)."""
    docs = cache.doc_ids()
    return {"training_dataset": dataset_identity(cache),
            "train_doc_ids": id_ranges(docs[:train_tokens]),
            "eval_doc_ids": id_ranges(docs[train_tokens:]),
            "normalization": norm.to_json()}
