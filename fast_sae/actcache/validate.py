"""Open-time checks of a cache's arrays against its attributes.

Why at open: a cache whose ``n_tokens`` disagrees with its arrays, whose sequence starts go
backwards, or whose array metadata says another dtype or chunk size than the attributes, would be
read as something it is not (evaluate once silently scored training tokens because of it). Each
check is cheap (array metadata documents and the sequence starts) and fails with one line naming
the file and the field.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from . import layout
from .layout import CacheError, CacheMeta
from .store import KeyMissing, Store


def _array_doc(store: Store, name: str) -> dict[str, Any]:
    key = f"{name}/zarr.json"
    try:
        data = store.retrying(lambda: store.get(key), key)
    except KeyMissing:
        raise CacheError(f"{store.where(name)}: array missing from the cache") from None
    try:
        doc = json.loads(bytes(data))
    except ValueError as exc:
        raise CacheError(f"{store.where(key)}: corrupt array metadata ({exc})") from None
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        raise CacheError(f"{store.where(key)}: not a zarr v3 array")
    return doc


def _expect(store: Store, name: str, doc: dict[str, Any], field: str, got: Any, want: Any) -> None:
    if got != want:
        raise CacheError(f"{store.where(name + '/zarr.json')}: {field} is {got!r}, the cache's attributes say "
                         f"{want!r}")


def validate_arrays(store: Store, meta: CacheMeta) -> None:
    n = meta.n_tokens
    for name, dtype in ((layout.TOKEN_IDS, "int32"), (layout.POSITIONS, "int32"), (layout.ROLES, "uint8"),
                        (layout.DOC_IDS, "int32")):
        doc = _array_doc(store, name)
        _expect(store, name, doc, "shape", doc.get("shape"), [n])
        _expect(store, name, doc, "data_type", doc.get("data_type"), dtype)
    doc = _array_doc(store, layout.SEQ_STARTS)
    _expect(store, layout.SEQ_STARTS, doc, "shape", doc.get("shape"), [meta.n_sequences + 1])
    _expect(store, layout.SEQ_STARTS, doc, "data_type", doc.get("data_type"), "int64")
    for layer in meta.layers:
        name = layout.acts_path(layer)
        doc = _array_doc(store, name)
        _expect(store, name, doc, "shape", doc.get("shape"), [n, meta.d_model])
        _expect(store, name, doc, "data_type", doc.get("data_type"), meta.dtype)
        chunks = ((doc.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        _expect(store, name, doc, "chunk_shape", chunks, [meta.chunk_tokens, meta.d_model])
        codecs = [c.get("name") for c in doc.get("codecs") or [] if isinstance(c, dict)]
        want = ["bytes"] if meta.compression == "none" else ["bytes", "zstd"]
        _expect(store, name, doc, "codecs", codecs, want)
        endian = ((doc.get("codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
        _expect(store, name, doc, "endian", endian, "little")


def validate_seq_starts(starts: np.ndarray, meta: CacheMeta, where: str) -> None:
    if starts.shape != (meta.n_sequences + 1,):
        raise CacheError(f"{where}: holds {len(starts)} entries, n_sequences + 1 is {meta.n_sequences + 1}")
    if len(starts) and (int(starts[0]) != 0 or int(starts[-1]) != meta.n_tokens):
        raise CacheError(f"{where}: runs from {int(starts[0])} to {int(starts[-1])}, expected 0 to n_tokens "
                         f"{meta.n_tokens}")
    if len(starts) > 1 and not bool(np.all(np.diff(starts) > 0)):
        bad = int(np.flatnonzero(np.diff(starts) <= 0)[0])
        raise CacheError(f"{where}: sequence starts are not increasing (entry {bad + 1}: {int(starts[bad + 1])} "
                         f"after {int(starts[bad])})")
