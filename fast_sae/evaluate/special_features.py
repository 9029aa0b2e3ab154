"""Feature discovery for the special-token intervention, from the cache only (no model).

For every special-token id at a special-token position (roles ``actcache.SPECIAL_ROLES``), the
feature's maximum activation over that token's occurrences in each sample (doc id), averaged over
the samples containing it: the FAST paper's "average maximum activation" (its Tables 12-18). Why a
module of its own: it is one streaming pass over the cache with its own bookkeeping, and the
evaluation runs it on held-out sequences only (``token_ranges``), apart from any generation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import SPECIAL_ROLES, ActivationCache, Role

from .interpret.top_examples import TokenRenderer, sae_layer

MARKER_ROLES = (Role.BOS, Role.SPECIAL, Role.SEPARATOR)  # true special tokens, not plain template text


@torch.no_grad()
def special_token_features(sae: Any, cache: ActivationCache, *, top_k: int = 5, layer: int | None = None,
                           block_tokens: int = 4096, token_ranges: list[tuple[int, int]] | None = None) -> list[dict]:
    """Per special-token id: its top ``top_k`` features by average (over samples) max activation.

    One streaming pass; only special-token rows are encoded. A sample is a doc id when doc ids are
    non-decreasing in the stream (always, for caches this tool writes), else a sequence. Returns
    ``[{token_id, token, marker, n_samples, n_occurrences, top: [{feature, value}]}]`` sorted by token
    id; ``marker`` is true for true special tokens (roles BOS / special / separator: <|im_start|>,
    <|im_end|> ...), false for plain template tokens (role names, newlines, a default system prompt).
    """
    layer = sae_layer(sae, cache) if layer is None else layer
    roles, ids = cache.roles(), cache.token_ids()
    special = np.isin(roles, [int(r) for r in SPECIAL_ROLES])
    if not special.any():
        return []
    docs = cache.doc_ids().astype(np.int64)
    sample = docs if np.all(np.diff(docs) >= 0) else cache.sequence_of_token().astype(np.int64)
    if token_ranges is not None:  # only these tokens count (e.g. the held-out eval sequences)
        inside = np.zeros(len(special), dtype=bool)
        for a, b in token_ranges:
            inside[a:b] = True
        special &= inside
        if not special.any():
            return []
    token_set = np.unique(ids[special])
    slot_of = {int(t): i for i, t in enumerate(token_set)}
    d_sae = int(sae.d_sae)
    sums = torch.zeros(len(token_set), d_sae, dtype=torch.float64)
    n_samples = torch.zeros(len(token_set), dtype=torch.int64)
    pending_keys = np.zeros((0, 2), np.int64)  # (sample, token) pairs of the still-open sample
    pending_max = torch.zeros(0, d_sae)

    def finalize(keys: np.ndarray, maxima: torch.Tensor) -> None:
        slots = torch.as_tensor([slot_of[int(t)] for t in keys[:, 1]], dtype=torch.int64)
        sums.index_add_(0, slots, maxima.double())
        n_samples.index_add_(0, slots, torch.ones_like(slots))

    for start, chunk in cache.iter_chunks(layer):
        stop = start + chunk.shape[0]
        rows = np.flatnonzero(special[start:stop])
        if not len(rows) and not len(pending_keys):
            continue
        keys, maxima = pending_keys, pending_max
        for lo in range(0, len(rows), block_tokens):
            r = rows[lo:lo + block_tokens]
            f = sae.encode(torch.from_numpy(np.array(chunk[r], dtype=np.float32)).to(sae.W_enc.device)).float().cpu()
            keys = np.concatenate([keys, np.stack([sample[start + r], ids[start + r].astype(np.int64)], 1)])
            maxima = torch.cat([maxima, f])
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
            index = torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)[:, None].expand(-1, d_sae)
            maxima = torch.full((len(uniq), d_sae), -torch.inf).scatter_reduce(0, index, maxima, "amax")
            keys = uniq
        open_sample = sample[stop - 1]
        done = keys[:, 0] < open_sample
        if done.any():
            finalize(keys[done], maxima[torch.as_tensor(done)])
        pending_keys, pending_max = keys[~done], maxima[torch.as_tensor(~done)]
    if len(pending_keys):
        finalize(pending_keys, pending_max)

    avg = (sums / n_samples.clamp(min=1)[:, None]).float()
    k = min(top_k, d_sae)
    values, feats = torch.topk(avg, k, dim=1)
    render = TokenRenderer.for_cache(cache)
    occurrences = dict(zip(*np.unique(ids[special], return_counts=True)))
    markers = set(np.unique(ids[np.isin(roles, [int(r) for r in MARKER_ROLES])]).tolist())
    return [{"token_id": int(t), "token": render(int(t)), "marker": int(t) in markers,
             "n_samples": int(n_samples[i]), "n_occurrences": int(occurrences[t]),
             "top": [{"feature": int(f), "value": float(v)} for f, v in zip(feats[i], values[i])]}
            for i, t in enumerate(token_set)]


def pick_features(table: Sequence[dict], n: int) -> list[int]:
    """The ``n`` distinct features with the highest average max activation on a special token.

    Only marker tokens (<|im_start|>, <|im_end|>, BOS ...) are ranked when the table has any: plain
    template tokens include the template's default system prompt, whose features are content features.
    """
    rows = [row for row in table if row.get("marker")] or list(table)
    ranked = sorted(((e["value"], e["feature"]) for row in rows for e in row["top"] if e["value"] > 0),
                    key=lambda p: (-p[0], p[1]))
    picked: list[int] = []
    for _, f in ranked:
        if f not in picked:
            picked.append(f)
        if len(picked) == n:
            break
    return picked
