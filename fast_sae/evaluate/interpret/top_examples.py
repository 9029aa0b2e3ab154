"""Top-activating contexts and activation density per SAE feature, streamed from the cache.

Why from the cache: the token ids are stored beside the activations, so every feature's examples
come out without the model, in one sequential pass over the memory-mapped chunks.

How (exact and vectorised; no Python loop over features or tokens):
1. each chunk is encoded in sub-batches of tokens ``[b, d_sae]``;
2. within a sub-batch, an ``argmax`` over the tokens of each sequence (a loop over the block's few
   sequences, vectorised over features) gives one candidate per (sequence, feature): the *first*
   token attaining the sequence's maximum;
3. per feature, the best ``top_n`` sequences of the sub-batch are merged with the running
   ``[d_sae, top_n]`` table; a sequence that spans sub-batches may then appear twice, so the
   merged table is sorted (stable, old entries first) and every later entry of an already
   present sequence is dropped. The result is the true arg-max token of the ``top_n`` sequences
   with the highest maximum activation, one context per sequence ("deduplicated per sequence");
   ties go to the earlier token / sequence, so the result does not depend on the block size.
Density (share of tokens with activation > 0), max and mean activation are accumulated alongside.
With ``token_ranges`` only those tokens are read (an evaluation passes its held-out sequences, so a
feature's examples never come from the SAE's training data).

**Distinct contexts** (``distinct_window``, default 8 = the dashboard's window): one per sequence is
not enough on chat data. Every FAST conversation of SmolLM2 opens with the same default system
prompt, so a feature that peaks there had five top "examples" that were one context five times
(feature 19 of the demo's TopK k=32 SAE); a reader or a judge learns nothing from the copies. So
two tokens with the same id and the same ``distinct_window`` token ids before them (clipped to
the sequence) count as one context: only its first occurrence in the stream may be a top example,
and the example records its number of ``copies``. Why the tokens before, not the window either
side and not one example per document: a decoder's activation at a token is a function of the
tokens up to it, so equal histories are equal evidence about the feature (in the shared prefix of
FAST sequences the activations are identical, while a two-sided window around a peak near the
prefix's end would reach into each conversation and miss the copies); and the same history
recurs across documents (the default system prompt of every conversation in a BT block), which
one-per-document would not catch. Contexts are compared by a 64-bit hash (a collision, chance
~n²/2⁶⁵, would merge two contexts). Examples in the shared template prefix are kept, once, and
marked (``in_shared_prefix``: inside the token prefix every document read starts with, the tokens the
★ filter leaves out; position 0 is in ``position``): a template feature should still show its
template context.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import ActivationCache, CacheError

from ..token_filters import TokenFilters

# Elements of the [tokens, d_sae] activation block processed at once (~64 MB as float32 + int64 scratch).
_BLOCK_ELEMENTS = 1 << 23


@dataclass
class FeatureStats:
    """Whole-cache statistics per feature (arrays of length d_sae)."""

    density: np.ndarray  # fraction of tokens with activation > 0
    max_act: np.ndarray
    mean_act: np.ndarray
    n_tokens: int


@dataclass
class TopExamples:
    """Per feature, the ``top_n`` best sequences: value, arg-max token (global index) and sequence.

    Rows are sorted by value, descending. Empty slots hold value -inf, token -1, sequence -1;
    a feature that never fires keeps values <= 0, which reports treat as "no context".
    """

    values: np.ndarray  # (d_sae, top_n) float32
    token_index: np.ndarray  # (d_sae, top_n) int64
    seq_index: np.ndarray  # (d_sae, top_n) int64
    stats: FeatureStats
    copies: np.ndarray | None = None  # (d_sae, top_n) tokens read with the same context (0: empty slot)
    prefix_length: int = 0  # the token prefix every document read shares (token_filters.py)
    filters: TokenFilters | None = None  # the ★ rule of the tokens read
    distinct_window: int | None = None  # the context deduplication's window (None: one per sequence only)

    def selection_rule(self) -> str:
        """How the examples were chosen, in words (the dashboard and top_examples.json say it)."""
        rule = "the highest-activating token of each sequence, one example per sequence"
        if self.distinct_window is not None:
            rule += (f"; tokens with the same id and the same {self.distinct_window} token ids before them count "
                     f"once: the first copy is shown with its number of copies")
        return rule + (f"; examples inside the {self.prefix_length}-token prefix every sequence shares (left out "
                       f"by the ★ filter) are marked" if self.prefix_length else "")


def context_keys(ids: np.ndarray, seq_starts: np.ndarray, seq_of_token: np.ndarray, index: np.ndarray,
                 window: int) -> np.ndarray:
    """A 64-bit hash per token of ``index``: its id and the ``window`` ids before it, clipped to its sequence."""
    seq = seq_of_token[index]
    lo = seq_starts[seq]
    h = np.full(len(index), 0xCBF29CE484222325, dtype=np.uint64)
    prime, shift = np.uint64(0x100000001B3), np.uint64(29)
    for offset in range(-window, 1):
        j = index + offset
        v = np.where(j >= lo, ids[np.maximum(j, 0)].astype(np.int64) + 1, 0).astype(np.uint64)
        h = (h ^ v) * prime
        h ^= h >> shift
    return h


def first_contexts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each token is the first of its context in stream order, how many tokens share its context)."""
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    return first[inverse] == np.arange(len(keys)), counts[inverse]


class TopKCollector:
    """Running per-feature top-``top_n`` table; feed it consecutive token blocks with ``update``."""

    def __init__(self, d_sae: int, top_n: int, seq_of_token: np.ndarray, eligible: np.ndarray | None = None) -> None:
        """``eligible`` (per cache token, optional): which tokens may be an example (the first copy of each
        context); statistics count every token."""
        if top_n < 1:
            raise ValueError("top_n must be >= 1")
        self.d_sae, self.top_n = d_sae, top_n
        self.seq_of_token = torch.as_tensor(np.asarray(seq_of_token, dtype=np.int64))
        self.eligible = None if eligible is None else torch.as_tensor(np.asarray(eligible, dtype=bool))
        self.values = torch.full((d_sae, top_n), -torch.inf)
        self.tokens = torch.full((d_sae, top_n), -1, dtype=torch.int64)
        self.seqs = torch.full((d_sae, top_n), -1, dtype=torch.int64)
        self.n_active = torch.zeros(d_sae, dtype=torch.int64)
        self.max_act = torch.full((d_sae,), -torch.inf)
        self.sum_act = torch.zeros(d_sae, dtype=torch.float64)
        self.n_tokens = 0

    def update(self, start: int, acts: torch.Tensor) -> None:
        """Add feature activations ``acts`` [b, d_sae] of the tokens ``[start, start + b)``."""
        b = acts.shape[0]
        if b == 0:
            return
        acts = acts.float()
        if self.n_active.device != acts.device:  # statistics live where the activations are (GPU or CPU)
            self.n_active, self.max_act, self.sum_act = (t.to(acts.device) for t in
                                                         (self.n_active, self.max_act, self.sum_act))
        self.n_active += torch.count_nonzero(acts > 0, dim=0)
        self.max_act = torch.maximum(self.max_act, acts.max(0).values)
        self.sum_act += acts.sum(0).double()  # float32 within a block, float64 across blocks
        self.n_tokens += b
        if self.eligible is not None:  # a later copy of a context cannot be an example
            ok = self.eligible[start:start + b].to(acts.device)
            acts = acts.masked_fill(~ok[:, None], -torch.inf)

        seq = self.seq_of_token[start:start + b]
        uniq, counts = torch.unique_consecutive(seq, return_counts=True)  # sequences are contiguous
        counts = counts.tolist()
        n_local = len(counts)
        seg_max = torch.empty(n_local, self.d_sae, device=acts.device)
        seg_arg = torch.empty(n_local, self.d_sae, dtype=torch.int64, device=acts.device)
        lo = 0
        for i, count in enumerate(counts):  # a loop over the block's sequences, vectorised over features
            arg = acts[lo:lo + count].argmax(0)  # first maximal index: ties go to the earlier token
            seg_arg[i] = arg + lo
            seg_max[i] = acts[lo:lo + count].gather(0, arg[None])[0]
            lo += count

        k = min(self.top_n, n_local)
        # stable sort, not topk: equal maxima (e.g. the identical first token of every chat) keep stream order
        new_vals, new_local = (t[:k] for t in torch.sort(seg_max, dim=0, descending=True, stable=True))
        new_tokens = seg_arg.gather(0, new_local).cpu() + start
        new_seqs = uniq[new_local.cpu()]
        self._merge(new_vals.T.cpu(), new_tokens.T, new_seqs.T)

    def _merge(self, vals: torch.Tensor, tokens: torch.Tensor, seqs: torch.Tensor) -> None:
        all_vals = torch.cat([self.values, vals], 1)
        all_tokens = torch.cat([self.tokens, tokens], 1)
        all_seqs = torch.cat([self.seqs, seqs], 1)
        order = torch.sort(all_vals, dim=1, descending=True, stable=True).indices  # old first on ties
        all_vals, all_tokens, all_seqs = (t.gather(1, order) for t in (all_vals, all_tokens, all_seqs))
        m = all_seqs.shape[1]
        same = all_seqs[:, :, None] == all_seqs[:, None, :]  # [d_sae, m, m]
        earlier = torch.ones(m, m, dtype=torch.bool).triu(1)  # i < j
        duplicate = (same & earlier).any(1) & (all_seqs >= 0)
        all_vals = all_vals.masked_fill(duplicate, -torch.inf)
        order = torch.sort(all_vals, dim=1, descending=True, stable=True).indices[:, : self.top_n]
        self.values = all_vals.gather(1, order)
        keep = torch.isfinite(self.values)
        self.tokens = torch.where(keep, all_tokens.gather(1, order), -1)
        self.seqs = torch.where(keep, all_seqs.gather(1, order), -1)

    def result(self) -> TopExamples:
        n = max(self.n_tokens, 1)
        stats = FeatureStats(density=(self.n_active.double() / n).cpu().numpy(),
                             max_act=self.max_act.cpu().numpy().astype(np.float32),
                             mean_act=(self.sum_act / n).cpu().numpy(), n_tokens=self.n_tokens)
        return TopExamples(values=self.values.numpy(), token_index=self.tokens.numpy(),
                           seq_index=self.seqs.numpy(), stats=stats)


def sae_layer(sae: Any, cache: ActivationCache) -> int:
    """The cache layer an SAE reads (its ``hook_layer``), checked against the cache."""
    layer = int(sae.layer)
    if layer not in cache.layers:
        raise CacheError(f"{cache.path}: SAE hook_layer {layer} not in the cache (layers {cache.layers})")
    if int(sae.d_in) != cache.d_model:
        raise CacheError(f"{cache.path}: d_model {cache.d_model} but the SAE has d_in {sae.d_in}")
    return layer


def iter_token_blocks(cache: ActivationCache, layer: int, token_ranges: list[tuple[int, int]] | None,
                      block: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float32 rows)`` of at most ``block`` tokens: the whole cache chunk by chunk, or only
    ``token_ranges`` (sorted [start, stop) token ranges), in stream order."""
    if token_ranges is None:
        for start, chunk in cache.iter_chunks(layer):
            for lo in range(0, chunk.shape[0], block):
                yield start + lo, np.array(chunk[lo:lo + block], dtype=np.float32)
        return
    for a, b in token_ranges:
        for lo in range(a, b, block):
            yield lo, np.asarray(cache.read(layer, lo, min(lo + block, b)), dtype=np.float32)


@torch.no_grad()
def collect_top_examples(sae: Any, cache: ActivationCache, top_n: int = 5, *, layer: int | None = None,
                         block_tokens: int | None = None, token_ranges: list[tuple[int, int]] | None = None,
                         distinct_window: int | None = 8) -> TopExamples:
    """One streaming pass over the cache layer the SAE reads (or its ``token_ranges``); returns the top
    table and statistics over the tokens read. Examples are distinct contexts (module docstring) unless
    ``distinct_window`` is None (then only one per sequence)."""
    layer = sae_layer(sae, cache) if layer is None else layer
    d_sae = int(sae.d_sae)
    block = block_tokens or max(64, _BLOCK_ELEMENTS // max(d_sae, 1))
    seq_of_token, starts = cache.sequence_of_token(), cache.seq_starts()
    ranges = token_ranges if token_ranges is not None else [(0, cache.n_tokens)]
    index = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    eligible, copies = None, np.zeros(cache.n_tokens, dtype=np.int32)
    if distinct_window is not None:
        ids, step = cache.token_ids(), 1 << 22  # hashed in slices: a few arrays of one slice at a time
        keys = np.concatenate([context_keys(ids, starts, seq_of_token, index[i:i + step], distinct_window)
                               for i in range(0, len(index), step)]) if len(index) else np.zeros(0, np.uint64)
        first, n_copies = first_contexts(keys)
        eligible = np.zeros(cache.n_tokens, dtype=bool)
        eligible[index], copies[index] = first, n_copies
    collector = TopKCollector(d_sae, top_n, seq_of_token, eligible)
    device = sae.W_enc.device
    for start, rows in iter_token_blocks(cache, layer, token_ranges, block):
        collector.update(start, sae.encode(torch.from_numpy(rows).to(device)))
    top = collector.result()
    top.copies = np.where(top.token_index >= 0, copies[np.maximum(top.token_index, 0)], 0)
    top.filters = TokenFilters.of_runs(cache, list(ranges))
    top.prefix_length = top.filters.prefix_length
    top.distinct_window = distinct_window
    return top


class TokenRenderer:
    """Token id -> display text through the cache's tokenizer (memoised); ``<id>`` without one."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    @classmethod
    def for_cache(cls, cache: ActivationCache) -> TokenRenderer:
        try:
            return cls(cache.tokenizer())
        except CacheError:
            return cls(None)

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._memo:
            self._memo[token_id] = (f"<{token_id}>" if self.tokenizer is None
                                    else self.tokenizer.decode([token_id], skip_special_tokens=False))
        return self._memo[token_id]


@torch.no_grad()
def feature_contexts(sae: Any, cache: ActivationCache, top: TopExamples, features: list[int], *,
                     window: int = 8, render: TokenRenderer | None = None, layer: int | None = None) -> list[dict]:
    """Context windows for the given features: tokens ``window`` either side of each arg-max token,
    clipped to its sequence, with the feature's activation on every token of the window.

    Returns one JSON-ready dict per feature (statistics plus its contexts with activation > 0).
    """
    layer = sae_layer(sae, cache) if layer is None else layer
    render = render or TokenRenderer.for_cache(cache)
    starts = cache.seq_starts()
    ids, positions = cache.token_ids(), cache.positions()
    out = []
    for k in features:
        contexts = []
        for slot, (value, tok, seq) in enumerate(zip(top.values[k], top.token_index[k], top.seq_index[k])):
            if not value > 0:
                continue
            lo, hi = max(int(starts[seq]), int(tok) - window), min(int(starts[seq + 1]), int(tok) + window + 1)
            x = torch.from_numpy(np.array(cache.read(layer, lo, hi), dtype=np.float32)).to(sae.W_enc.device)
            acts = sae.encode(x)[:, k].cpu().tolist()
            window_ids = ids[lo:hi].tolist()
            contexts.append({
                "sequence": int(seq), "token_index": int(tok), "position": int(positions[tok]),
                "max_act": float(value), "peak": int(tok) - lo, "token_ids": window_ids,
                "tokens": [render(i) for i in window_ids], "acts": [float(a) for a in acts],
                "copies": int(top.copies[k][slot]) if top.copies is not None else 1,
                "in_shared_prefix": bool(top.filters.in_prefix(np.array([tok]))[0]) if top.filters is not None
                else bool(positions[tok] < top.prefix_length),
            })
        out.append({"feature": int(k), "density": float(top.stats.density[k]),
                    "max_act": float(top.stats.max_act[k]), "mean_act": float(top.stats.mean_act[k]),
                    "contexts": contexts})
    return out


def live_features(top: TopExamples) -> np.ndarray:
    """Features with at least one positive activation (the paper drops dead ones before sampling)."""
    return np.flatnonzero(top.values[:, 0] > 0)


def sample_features(top: TopExamples, n: int, seed: int = 0) -> list[int]:
    """``n`` live features drawn without replacement (seeded), sorted; all live ones if fewer."""
    live = live_features(top)
    if n >= len(live):
        return [int(k) for k in live]
    rng = np.random.default_rng(seed)
    return sorted(int(k) for k in rng.choice(live, size=n, replace=False))
