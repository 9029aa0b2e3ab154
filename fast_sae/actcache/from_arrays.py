"""Build a complete cache from in-memory arrays.

Why: tests of later stages need caches with known content (synthetic sparse dictionaries), and
users may import activations computed elsewhere; both go through the same writer as a harvest, so
the result is a real cache that the readers cannot tell apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .layout import CacheMeta, Role
from .store import RemotePath, parse_location
from .writer import CacheWriter, TokenArrays


def write_cache_from_arrays(path: str | Path | RemotePath, acts: dict[int, np.ndarray], *,
                            seq_starts: np.ndarray | None = None,
                            token_ids: np.ndarray | None = None, roles: np.ndarray | None = None,
                            doc_ids: np.ndarray | None = None, chunk_tokens: int = 1024, dtype: str = "float32",
                            compression: str = "none",
                            regime: str = "fast", model_id: str = "synthetic", dataset: str = "synthetic",
                            tokenizer: Any | None = None, n_model_layers: int | None = None,
                            options: dict[str, str] | None = None) -> Path | RemotePath:
    """A complete cache of ``acts`` (layer -> (n, d_model)); one document per sequence unless ``doc_ids``
    (n,) says otherwise (e.g. BT blocks that span documents)."""
    layers = sorted(acts)
    n, d = acts[layers[0]].shape
    if seq_starts is None:
        seq_starts = np.array([0, n], dtype=np.int64)
    seq_starts = np.asarray(seq_starts, dtype=np.int64)
    seq_index = np.repeat(np.arange(len(seq_starts) - 1), np.diff(seq_starts))
    positions = np.arange(n) - seq_starts[seq_index]
    tokens = TokenArrays(
        ids=np.zeros(n, np.int32) if token_ids is None else np.asarray(token_ids, np.int32),
        positions=positions.astype(np.int32),
        roles=np.full(n, int(Role.TEXT), np.uint8) if roles is None else np.asarray(roles, np.uint8),
        doc_ids=seq_index.astype(np.int32) if doc_ids is None else np.asarray(doc_ids, np.int32),
        seq_starts=seq_starts,
    )
    meta = CacheMeta(model_id=model_id, model_revision=None, d_model=d,
                     n_model_layers=n_model_layers or (max(layers) + 1), layers=layers, dtype=dtype,
                     regime=regime, context_size=int(np.diff(seq_starts).max()), dataset=dataset,
                     dataset_fingerprint="", chat_template_hash=None, n_tokens=n,
                     n_sequences=len(seq_starts) - 1, chunk_tokens=chunk_tokens, compression=compression,
                     bos_token_id=None, eos_token_id=None, special_token_ids=[],
                     harvest_args={"source": "arrays", "dataset": dataset})
    writer = CacheWriter.open(path, meta, tokens, tokenizer, options=options, log=lambda *_: None)
    writer.write(0, {layer: acts[layer] for layer in layers})
    writer.finish()
    return parse_location(path)
