"""Building the token stream of each regime: FAST, BT(F), BT(P) (cache_layout.md, "Regimes").

FAST keeps one conversation per sequence; the two block-training baselines concatenate and cut
into fixed blocks, so their blocks mix samples and cut them mid-way, as SAELens does.

Which documents enter a stream is decided first (``DocSelection``), by dataset index, before any
rendering or token budget: a held-out evaluation cache and the training caches of every regime can
then be harvested from one dataset with provably disjoint documents.
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fast_sae.actcache import Role, TokenArrays

from .data import Fingerprint
from .render import MESSAGE_ROLES, RenderError, RenderPolicy, TemplateInfo, render_conversation

SEPARATORS = ("none", "bos", "eos")
DOC_SETS = ("all", "train", "holdout")


class StreamError(Exception):
    """The requested stream cannot be built; one line."""


@dataclass(frozen=True)
class DocSelection:
    """Which documents a stream reads, by ``doc_id`` (the sample's index in the dataset, never renumbered).

    A document is *held out* iff a hash of ``(seed, doc_id)`` falls below ``fraction``: a seeded
    random sample that needs no pass over the dataset (it works on streamed hub datasets), gives
    the same answer for a document whatever else is read, and splits every dataset prefix the same
    way. ``docs`` picks ``all`` documents, only the held-out ones (``holdout``: an evaluation
    cache) or only the others (``train``: the training caches of every regime).
    """

    docs: str = "all"
    fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.docs not in DOC_SETS:
            raise StreamError(f"--docs {self.docs!r}: expected one of {', '.join(DOC_SETS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise StreamError(f"--holdout-fraction {self.fraction}: expected a share between 0 and 1")
        if self.docs != "all" and not 0.0 < self.fraction < 1.0:
            raise StreamError(f"--docs {self.docs} needs --holdout-fraction strictly between 0 and 1 "
                              f"(got {self.fraction}): it would select all documents or none")

    def held_out(self, doc_id: int) -> bool:
        """Whether ``doc_id`` belongs to the held-out sample (independent of ``docs``)."""
        digest = hashlib.blake2b(f"{self.seed}:{int(doc_id)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0 ** 64 < self.fraction

    def keep(self, doc_id: int) -> bool:
        """Whether a stream with this selection reads ``doc_id``."""
        if self.docs == "all":
            return True
        return self.held_out(doc_id) == (self.docs == "holdout")

    def describe(self) -> dict[str, Any]:
        return {"docs": self.docs, "holdout_fraction": self.fraction, "holdout_seed": self.seed}


ALL_DOCS = DocSelection()


@dataclass
class Piece:
    """One rendered sample: its tokens, their roles, and the sample's index in the dataset."""

    ids: np.ndarray
    roles: np.ndarray
    doc_id: int


def _stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def chat_pieces(conversations: Iterable[list[dict[str, str]]], tokenizer: Any, info: TemplateInfo,
                fingerprint: Fingerprint, system_prompt: str | None = None, policy: RenderPolicy | None = None,
                warn: Callable[[str], None] = _stderr, selection: DocSelection = ALL_DOCS) -> Iterator[Piece]:
    """Rendered conversations; the first use of each unknown role and of special-token text in content
    is reported through ``warn`` (what the policy did with it), and a refusal names the conversation.
    Only the documents ``selection`` keeps are rendered and fingerprinted."""
    policy = policy or RenderPolicy()
    seen: set[str] = set()
    escaped_reported = False
    for doc_id, messages in enumerate(conversations):
        if not selection.keep(doc_id):
            continue
        if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        fingerprint.add(messages)
        try:
            ids, roles = render_conversation(tokenizer, messages, info, policy)
        except RenderError as exc:
            raise RenderError(f"conversation {doc_id}: {exc}") from None
        for i, m in enumerate(messages):
            if m["role"] not in MESSAGE_ROLES and m["role"] not in seen:
                seen.add(m["role"])
                warn(f"conversation {doc_id}: role {m['role']!r} is stored with role code 'other' "
                     f"(neither special nor content in the metrics)")
            hit = next((t for t in info.special_strings if t in m["content"]), None)
            if hit is not None and not escaped_reported:
                escaped_reported = True
                warn(f"conversation {doc_id}: message {i} ({m['role']}) contains special-token text {hit!r}; "
                     f"tokenized as plain text (further cases are not reported)")
        yield Piece(ids, roles, doc_id)


def text_pieces(texts: Iterable[str], tokenizer: Any, fingerprint: Fingerprint,
                selection: DocSelection = ALL_DOCS) -> Iterator[Piece]:
    for doc_id, text in enumerate(texts):
        if not selection.keep(doc_id):
            continue
        fingerprint.add(text)
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        yield Piece(ids, np.full(len(ids), int(Role.TEXT), np.uint8), doc_id)


def _assemble(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> TokenArrays:
    if not seqs:
        raise StreamError("the dataset produced no sequence (empty dataset, or fewer tokens than one block)")
    lengths = np.array([len(s[0]) for s in seqs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return TokenArrays(
        ids=np.concatenate([s[0] for s in seqs]).astype(np.int32),
        positions=np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        roles=np.concatenate([s[1] for s in seqs]).astype(np.uint8),
        doc_ids=np.concatenate([s[2] for s in seqs]).astype(np.int32),
        seq_starts=starts.astype(np.int64),
    )


def fast_stream(pieces: Iterable[Piece], context_size: int, max_tokens: int | None) -> TokenArrays:
    """One piece per sequence, truncated at context_size, in dataset order; stops before max_tokens is passed."""
    seqs = []
    total = 0
    for p in pieces:
        ids, roles = p.ids[:context_size], p.roles[:context_size]
        if not len(ids):
            continue
        if max_tokens is not None and total + len(ids) > max_tokens:
            break
        seqs.append((ids, roles, np.full(len(ids), p.doc_id, np.int64)))
        total += len(ids)
    return _assemble(seqs)


def block_stream(pieces: Iterable[Piece], context_size: int, max_tokens: int | None,
                 separator_id: int | None = None) -> TokenArrays:
    """Concatenate pieces (optionally with a separator token before each) and cut into full blocks."""
    budget = None if max_tokens is None else (max_tokens // context_size) * context_size
    ids_parts, role_parts, doc_parts = [], [], []
    total = 0
    for p in pieces:
        if separator_id is not None:
            ids_parts.append(np.array([separator_id]))
            role_parts.append(np.array([int(Role.SEPARATOR)], np.uint8))
            doc_parts.append(np.array([p.doc_id]))
            total += 1
        ids_parts.append(p.ids)
        role_parts.append(p.roles)
        doc_parts.append(np.full(len(p.ids), p.doc_id, np.int64))
        total += len(p.ids)
        if budget is not None and total >= budget:
            break
    if not ids_parts:
        raise StreamError("the dataset produced no tokens")
    ids, roles, docs = (np.concatenate(x) for x in (ids_parts, role_parts, doc_parts))
    n_blocks = len(ids) // context_size
    if budget is not None:
        n_blocks = min(n_blocks, budget // context_size)
    if n_blocks == 0:
        raise StreamError(f"the dataset has {len(ids)} tokens, fewer than one block of --context-size {context_size}")
    seqs = [(ids[i * context_size:(i + 1) * context_size], roles[i * context_size:(i + 1) * context_size],
             docs[i * context_size:(i + 1) * context_size]) for i in range(n_blocks)]
    return _assemble(seqs)
