"""Which eval tokens each token filter keeps: all tokens, without the sink, and the headline ★.

Why one module: reconstruction, downstream loss and the probes must score the same tokens, and
the rule has to hold for every cache format, not only FAST's one-conversation-per-sequence:
- ``no_pos0``: without position 0 of each sequence, the attention sink (in a BT block it is
  wherever the block starts, mid-document or not);
- ``no_prefix`` (★, the headline): also without each *document's* shared prefix: the longest
  token prefix common to every document that starts among the selected tokens (on SmolLM2,
  ``<|im_start|>system`` and the template's default system prompt, ~24 tokens). In a FAST cache a
  document is a sequence, so this is the prefix every eval sequence shares; in a BT(F) block the
  same template prefix recurs at every conversation start inside the block, and is removed there
  too (its activations differ from block to block, but the tokens are template, not data); in
  BT(P) text no prefix is usually shared and ★ equals ``no_pos0``. Documents are runs of equal
  ``tokens/doc_ids`` in stream order; a document's position counts from its first token in the
  cache, so a prefix cut by a block boundary is still removed in the next block.
With fewer than two documents starting in the selection nothing is "shared" (prefix 0). The
cache's last document's length does not count when there are others (a BT stream ends wherever
the token budget ran out, possibly two tokens into a conversation); its tokens still do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache

from .sources import EvalSelection

TOKEN_FILTERS = ("all_tokens", "no_pos0", "no_prefix")
HEADLINE_FILTER = "no_prefix"


def shared_prefix_length(token_ids: np.ndarray, begins: np.ndarray, ends: np.ndarray,
                         last_may_be_cut: bool = False) -> int:
    """Length of the longest token prefix common to every span [begins[i], ends[i]) (0 with fewer than two).

    ``last_may_be_cut``: the last span is the cache's last document, which a BT stream may cut
    anywhere (the token budget ran out two tokens into a conversation). Its tokens still vote
    where they differ from the others, but its shortness does not shorten the prefix.
    """
    if len(begins) < 2:
        return 0
    if last_may_be_cut and len(begins) > 2:
        k = shared_prefix_length(token_ids, begins[:-1], ends[:-1])
        last = token_ids[begins[-1]:min(ends[-1], begins[-1] + k)]
        differ = np.flatnonzero(last != token_ids[begins[0]:begins[0] + len(last)])
        return int(differ[0]) if len(differ) else k
    shortest = int((ends - begins).min())
    k = 0
    while k < shortest and np.all(token_ids[begins + k] == token_ids[begins[0] + k]):
        k += 1
    return k


@dataclass
class TokenFilters:
    """The filters of one eval selection, applicable to any range of the cache's tokens."""

    seq_starts: np.ndarray  # the cache's sequence offsets (S+1,)
    doc_starts: np.ndarray  # first token of every document run in the cache, ascending
    prefix_length: int  # the prefix shared by the documents that start in the selection
    n_documents: int  # documents starting in the selection (the prefix's support)

    @classmethod
    def of(cls, cache: ActivationCache, selection: EvalSelection) -> TokenFilters:
        return cls.of_runs(cache, selection.token_runs())

    @classmethod
    def of_runs(cls, cache: ActivationCache, runs: list[tuple[int, int]]) -> TokenFilters:
        """The filters of the tokens in ``runs`` ([start, stop) token ranges of the cache)."""
        doc_ids = cache.doc_ids()
        n = len(doc_ids)
        doc_starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]]) if n else np.zeros(0, np.int64)
        doc_ends = np.r_[doc_starts[1:], n].astype(np.int64)
        selected = np.zeros(n, bool)
        for a, b in runs:
            selected[a:b] = True
        inside = selected[doc_starts] if n else np.zeros(0, bool)
        begins, ends = doc_starts[inside], doc_ends[inside]
        prefix = shared_prefix_length(cache.token_ids(), begins, ends, last_may_be_cut=bool(n and inside[-1]))
        return cls(seq_starts=cache.seq_starts(), doc_starts=doc_starts, prefix_length=prefix,
                   n_documents=int(inside.sum()))

    def keep(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Per filter, a bool mask over the global token indices ``index`` (any order)."""
        index = np.asarray(index, dtype=np.int64)
        seq = np.searchsorted(self.seq_starts, index, side="right") - 1
        not_sink = index != self.seq_starts[seq]
        doc = np.searchsorted(self.doc_starts, index, side="right") - 1
        doc_position = index - self.doc_starts[doc] if len(self.doc_starts) else index
        return {"all_tokens": np.ones(len(index), bool), "no_pos0": not_sink,
                "no_prefix": not_sink & (doc_position >= self.prefix_length)}

    def in_prefix(self, index: np.ndarray) -> np.ndarray:
        """Whether each token lies in its document's shared prefix (the tokens ★ leaves out besides position 0)."""
        index = np.asarray(index, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, index, side="right") - 1
        return (index - self.doc_starts[doc]) < self.prefix_length

    def keep_range(self, a: int, b: int) -> dict[str, np.ndarray]:
        return self.keep(np.arange(a, b))

    def describe(self, removed: dict[str, int]) -> dict[str, Any]:
        return {"headline": HEADLINE_FILTER, "shared_prefix_length": self.prefix_length,
                "prefix_documents": self.n_documents,
                "filters": {"all_tokens": {"key": "subsets", "removed_tokens": removed["all_tokens"],
                                           "what": "every eval token"},
                            "no_pos0": {"key": "subsets_no_pos0", "removed_tokens": removed["no_pos0"],
                                        "what": "without position 0 of each sequence (the attention sink)"},
                            "no_prefix": {"key": "subsets_no_prefix", "removed_tokens": removed["no_prefix"],
                                          "what": f"without the {self.prefix_length}-token prefix shared by the "
                                                  f"{self.n_documents} eval documents (at each document start), "
                                                  f"and without position 0 of each sequence"}}}
