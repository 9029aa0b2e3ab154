"""Reading the activation cache: metadata, token stream, and activations by memory map.

Why memory maps: training reads tens of GB sequentially many times; an uncompressed zarr v3 chunk
file is a plain little-endian C-order array (zarr writes full-size edge chunks too), so a chunk can
be mapped with ``np.memmap`` and handed to torch without a copy or a decode. Compressed caches fall
back to zarr's decoder.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import layout
from .layout import CacheError, CacheMeta


@dataclass
class LayerStats:
    """Per-layer statistics computed once at the end of the harvest (see actcache.stats)."""

    mean: np.ndarray  # (d_model,) float64, mean over all stored tokens
    mean_sq_norm: float  # E ||x||^2 over all tokens
    mean_sq_norm_content: float | None  # E ||x||^2 over content tokens only (no special/template/BOS)
    median_norm: float
    max_norm: float
    mean_sq_centered: float  # E ||x - mean||^2, the denominator of explained variance


class ActivationCache:
    """A harvested cache, opened read-only."""

    def __init__(self, path: Path, group: zarr.Group, meta: CacheMeta, attrs: dict[str, Any]) -> None:
        self.path = path
        self.group = group
        self.meta = meta
        self.attrs = attrs

    @classmethod
    def open(cls, path: str | Path, require_complete: bool = True) -> ActivationCache:
        path = Path(path)
        meta_file = path / "zarr.json"
        if not path.is_dir():
            raise CacheError(f"{path}: no such cache folder")
        if not meta_file.is_file():
            raise CacheError(f"{meta_file}: missing; {path} is not a zarr v3 activation cache")
        try:
            doc = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"{meta_file}: unreadable or corrupt JSON ({exc})") from None
        attrs = doc.get("attributes") or {}
        meta = CacheMeta.from_attrs(attrs, str(meta_file))
        try:
            group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises many kinds here
            raise CacheError(f"{path}: cannot open as a zarr v3 group ({exc})") from None
        cache = cls(path, group, meta, attrs)
        for name in (layout.TOKEN_IDS, layout.POSITIONS, layout.ROLES, layout.DOC_IDS, layout.SEQ_STARTS,
                     *(layout.acts_path(layer) for layer in meta.layers)):
            if not (path / name / "zarr.json").is_file():
                raise CacheError(f"{path / name}: array missing from the cache")
        if require_complete and not cache.complete:
            raise CacheError(f"{path}: harvest not finished ({cache.tokens_committed} of {meta.n_tokens} tokens "
                             f"committed); rerun the same harvest command to resume it")
        return cache

    # ------------------------------------------------------------------ state
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def tokens_committed(self) -> int:
        return int(self.attrs.get("tokens_committed", 0))

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def n_chunks(self) -> int:
        return -(-self.meta.n_tokens // self.meta.chunk_tokens)

    @property
    def memmappable(self) -> bool:
        return self.meta.compression == "none"

    # ------------------------------------------------------------------ token stream
    def _small(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][:])

    @cached_property
    def _tokens(self) -> dict[str, np.ndarray]:
        return {name: self._small(name) for name in
                (layout.TOKEN_IDS, layout.POSITIONS, layout.ROLES, layout.DOC_IDS, layout.SEQ_STARTS)}

    def token_ids(self) -> np.ndarray:
        return self._tokens[layout.TOKEN_IDS]

    def positions(self) -> np.ndarray:
        return self._tokens[layout.POSITIONS]

    def roles(self) -> np.ndarray:
        return self._tokens[layout.ROLES]

    def doc_ids(self) -> np.ndarray:
        return self._tokens[layout.DOC_IDS]

    def seq_starts(self) -> np.ndarray:
        return self._tokens[layout.SEQ_STARTS]

    def sequence_of_token(self) -> np.ndarray:
        """Index of the sequence each token belongs to."""
        starts = self.seq_starts()
        return np.repeat(np.arange(len(starts) - 1), np.diff(starts))

    # ------------------------------------------------------------------ activations
    def _check_layer(self, layer: int) -> None:
        if layer not in self.meta.layers:
            raise CacheError(f"{self.path}: layer {layer} not in cache (layers: {self.meta.layers})")

    def chunk_file(self, layer: int, index: int) -> Path:
        """Path of chunk ``index`` of a layer (zarr v3 default chunk key encoding, '/' separator)."""
        return self.path / layout.acts_path(layer) / "c" / str(index) / "0"

    def chunk_bytes(self) -> int:
        return self.meta.chunk_tokens * self.meta.d_model * np.dtype(self.meta.dtype).itemsize

    def chunk_rows(self, index: int) -> int:
        start = index * self.meta.chunk_tokens
        return min(self.meta.chunk_tokens, self.meta.n_tokens - start)

    def memmap_chunk(self, layer: int, index: int) -> np.ndarray:
        """Rows of one chunk as a read-only memory map (uncompressed caches only)."""
        self._check_layer(layer)
        if not self.memmappable:
            raise CacheError(f"{self.path}: compressed cache ({self.meta.compression}) cannot be memory-mapped")
        f = self.chunk_file(layer, index)
        size = f.stat().st_size if f.is_file() else -1
        if size != self.chunk_bytes():
            what = "missing" if size < 0 else f"{size} bytes, expected {self.chunk_bytes()}"
            raise CacheError(f"{f}: chunk file {what}; the cache is truncated or corrupt")
        mm = np.memmap(f, dtype=np.dtype(self.meta.dtype).newbyteorder("<"), mode="r",
                       shape=(self.meta.chunk_tokens, self.meta.d_model))
        return mm[: self.chunk_rows(index)]

    def read(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Activations of tokens [start, stop) of a layer, in the stored dtype."""
        self._check_layer(layer)
        if not (0 <= start <= stop <= self.meta.n_tokens):
            raise CacheError(f"{self.path}: token range [{start}, {stop}) outside [0, {self.meta.n_tokens})")
        if not self.memmappable:
            return np.asarray(self.group[layout.acts_path(layer)][start:stop])
        chunk = self.meta.chunk_tokens
        parts = []
        pos = start
        while pos < stop:
            index = pos // chunk
            lo = pos - index * chunk
            hi = min(stop - index * chunk, self.chunk_rows(index))
            parts.append(self.memmap_chunk(layer, index)[lo:hi])
            pos = index * chunk + hi
        if not parts:
            return np.zeros((0, self.meta.d_model), dtype=self.meta.dtype)
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def iter_chunks(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start token, activations) for every chunk of a layer, in order."""
        for index in range(self.n_chunks):
            start = index * self.meta.chunk_tokens
            if self.memmappable:
                yield start, self.memmap_chunk(layer, index)
            else:
                yield start, self.read(layer, start, start + self.chunk_rows(index))

    def verify_chunks(self, upto: int | None = None) -> None:
        """Check every chunk file below the watermark exists with the right size (uncompressed) or decodes."""
        upto = self.tokens_committed if upto is None else upto
        n_full = -(-upto // self.meta.chunk_tokens)
        for layer in self.meta.layers:
            for index in range(n_full):
                if self.memmappable:
                    self.memmap_chunk(layer, index)
                else:
                    f = self.chunk_file(layer, index)
                    if not f.is_file():
                        raise CacheError(f"{f}: chunk file missing below the committed watermark; the cache is corrupt")

    # ------------------------------------------------------------------ statistics and tokenizer
    def layer_stats(self, layer: int) -> LayerStats:
        self._check_layer(layer)
        stats = (self.attrs.get("stats") or {}).get(str(layer))
        if stats is None:
            raise CacheError(f"{self.path}: no statistics for layer {layer} (harvest not finished?)")
        mean = np.asarray(self.group[layout.mean_path(layer)][:], dtype=np.float64)
        return LayerStats(mean=mean, mean_sq_norm=stats["mean_sq_norm"],
                          mean_sq_norm_content=stats.get("mean_sq_norm_content"),
                          median_norm=stats["median_norm"], max_norm=stats["max_norm"],
                          mean_sq_centered=stats["mean_sq_centered"])

    def tokenizer(self) -> Any:
        """The model's tokenizer saved inside the cache, so tokens render as text without the model."""
        from transformers import AutoTokenizer

        folder = self.path / layout.TOKENIZER_DIR
        if not folder.is_dir():
            raise CacheError(f"{folder}: no tokenizer stored in the cache")
        return AutoTokenizer.from_pretrained(str(folder))

    def summary(self) -> dict[str, Any]:
        m = self.meta
        roles = self.roles()
        counts = {layout.ROLE_NAMES[int(k)]: int(v) for k, v in zip(*np.unique(roles, return_counts=True))}
        return {
            "path": str(self.path), "complete": self.complete, "tokens_committed": self.tokens_committed,
            "model": m.model_id, "regime": m.regime, "layers": m.layers, "d_model": m.d_model,
            "n_tokens": m.n_tokens, "n_sequences": m.n_sequences, "context_size": m.context_size,
            "dtype": m.dtype, "compression": m.compression, "chunk_tokens": m.chunk_tokens,
            "dataset": m.dataset, "dataset_fingerprint": m.dataset_fingerprint,
            "chat_template_hash": m.chat_template_hash, "roles": counts,
            "bytes_on_disk": sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()),
            "stats": self.attrs.get("stats"),
        }
