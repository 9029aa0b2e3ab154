"""The special-token intervention measured without a judge: how steering changes the likelihood of
the reference reply.

Why: the paper's §6 claim (steering special-token features improves replies) was only ever scored by
an LLM judge, and an uncalibrated judge is no measurement. The log-likelihood of a held-out reference
reply is one the model computes itself: for each held-out conversation of the eval cache (its tokens
and roles, exactly as harvested: chat template included) the context is everything before the first
assistant turn (system + user turn + the assistant header) and the reply is that assistant turn's
first ``reply_tokens`` tokens. The figure is the mean log-probability per reply token, under

- the SAE's special-token features (discovered on the held-out tokens, special_features.py),
  steered as in the intervention: ``alpha × unit decoder direction`` added to the residual stream
  after the SAE's block (intervention.steering), for every alpha (0 included);
- control 1: random unit directions (isotropic Gaussian, normalised), same alphas;
- control 2: random SAE features of matched activation frequency (each special feature's frequency
  on the eval tokens within a factor of 2; the nearest in log frequency if fewer), same alphas.

Per (group, alpha) the change vs the unsteered reply, averaged over the group's directions per
conversation, is reported as mean ± standard error over conversations, with the paired differences
special − control. alpha = 0 adds exactly zero, so it reproduces the unsteered value bit for bit
(checked and recorded). Higher is better: a special-token feature that "improves replies" should
raise the reference reply's likelihood more than (or lower it less than) the controls. The reference
reply is one good reply, not the only one: a change here is a change of the model's distribution
towards or away from the data's replies, not a quality score.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import ActivationCache, Role

from .intervention import SteeringSpec, steering, steering_direction

GROUPS = ("special", "random_direction", "matched_feature")
GROUP_LABELS = {"special": "special-token features", "random_direction": "random unit directions",
                "matched_feature": "random features, matched frequency"}


@dataclass
class Conversation:
    """One held-out conversation: the context before the first assistant reply, and that reply."""

    sequence: int
    start: int  # cache index of the context's first token
    context: list[int]
    reply: list[int]


def held_out_conversations(cache: ActivationCache, token_ranges: list[tuple[int, int]] | None, *, n: int,
                           reply_tokens: int, max_context_tokens: int = 512, seed: int = 0) -> list[Conversation]:
    """Up to ``n`` conversations (seeded sample, in stream order) whose document starts inside its sequence,
    has a user turn before its first assistant turn and a context of at most ``max_context_tokens``."""
    ids, roles, docs = cache.token_ids(), cache.roles(), cache.doc_ids()
    starts = cache.seq_starts()
    inside = np.zeros(len(ids), bool)
    for a, b in token_ranges if token_ranges is not None else [(0, len(ids))]:
        inside[a:b] = True
    found: list[Conversation] = []
    for s in range(len(starts) - 1):
        a, b = int(starts[s]), int(starts[s + 1])
        if not inside[a:b].all():
            continue
        r = roles[a:b]
        assistant = np.flatnonzero(r == int(Role.ASSISTANT))
        if not len(assistant):
            continue
        first = int(assistant[0])
        doc_start = a + int(np.flatnonzero(docs[a:b] == docs[a + first])[0])
        if doc_start == a and docs[a] == (docs[a - 1] if a > 0 else -1):
            continue  # the document began in an earlier sequence: its context is cut
        if not (r[doc_start - a:first] == int(Role.USER)).any() or first - (doc_start - a) > max_context_tokens:
            continue
        end = first
        while end < b - a and r[end] == int(Role.ASSISTANT) and end - first < reply_tokens:
            end += 1
        found.append(Conversation(sequence=s, start=doc_start, context=ids[doc_start:a + first].tolist(),
                                  reply=ids[a + first:a + end].tolist()))
    if len(found) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(found), size=n, replace=False))
        found = [found[i] for i in keep]
    return found


@torch.no_grad()
def reply_loglik(model: Any, conversations: Sequence[Conversation], batch_size: int = 8) -> np.ndarray:
    """Mean log-probability per reply token of each conversation's reply given its context (float64).

    Right-padded batches: a causal model's logits at real positions do not see the padding after them.
    """
    device = next(model.parameters()).device
    out = np.zeros(len(conversations))
    for lo in range(0, len(conversations), batch_size):
        batch = conversations[lo:lo + batch_size]
        seqs = [c.context + c.reply for c in batch]
        width = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, c in enumerate(batch):  # only the reply positions: the full (batch, length, vocab) is large
            pos = torch.arange(len(c.context) - 1, len(c.context) + len(c.reply) - 1, device=logits.device)
            logp = logits[i, pos].double().log_softmax(-1)
            target = torch.tensor(c.reply, device=logits.device)
            out[lo + i] = float(logp[torch.arange(len(c.reply), device=logits.device), target].mean())
    return out


def feature_frequency(sae: Any, cache: ActivationCache, layer: int, token_ranges: list[tuple[int, int]] | None,
                      block: int = 4096) -> np.ndarray:
    """Share of the given tokens on which each feature is active (> 0)."""
    counts = torch.zeros(int(sae.d_sae), dtype=torch.float64)
    total = 0
    for a, b in token_ranges if token_ranges is not None else [(0, cache.n_tokens)]:
        for lo in range(a, b, block):
            x = torch.from_numpy(np.array(cache.read(layer, lo, min(b, lo + block)), dtype=np.float32))
            with torch.no_grad():
                counts += (sae.encode(x.to(sae.W_enc.device)) > 0).sum(0).double().cpu()
            total += x.shape[0]
    return (counts / max(total, 1)).numpy()


def matched_features(freq: np.ndarray, targets: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` random features per target, active within a factor of 2 of its frequency (the nearest in log
    frequency if fewer), never a target itself and never dead."""
    rng = np.random.default_rng(seed)
    live = np.flatnonzero(freq > 0)
    chosen: list[int] = []
    for t in targets:
        pool = np.array([f for f in live if f not in targets and f not in chosen])
        if not len(pool) or freq[t] <= 0:
            continue
        gap = np.abs(np.log(freq[pool]) - np.log(freq[t]))
        near = pool[gap <= np.log(2)]
        if len(near) < n:
            near = pool[np.argsort(gap, kind="stable")[:n]]
        chosen += [int(f) for f in rng.choice(near, size=min(n, len(near)), replace=False)]
    return chosen


def _stat(values: np.ndarray) -> dict[str, float | None]:
    n = len(values)
    return {"mean": float(values.mean()) if n else None,
            "se": float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None}


def measure(model: Any, sae: Any, cache: ActivationCache, *, layer: int, features: list[int],
            alphas: Sequence[float], token_ranges: list[tuple[int, int]] | None, n_conversations: int = 16,
            reply_tokens: int = 32, n_random: int = 4, n_matched: int = 4, positions: str = "all",
            special_ids: tuple[int, ...] = (), frequency: np.ndarray | None = None, seed: int = 0,
            batch_size: int = 8) -> dict[str, Any]:
    """The measurement of the module docstring; returns a JSON-safe summary with ``rows`` (one per alpha)."""
    convs = held_out_conversations(cache, token_ranges, n=n_conversations, reply_tokens=reply_tokens, seed=seed)
    if len(convs) < 2:
        return {"skipped": f"{cache.path}: {len(convs)} held-out conversation(s) with a user turn before an assistant "
                           f"reply (needs >= 2; a BT(P) cache has none)"}
    freq = frequency if frequency is not None else feature_frequency(sae, cache, layer, token_ranges)
    g = torch.Generator().manual_seed(seed)
    d = int(sae.d_in)
    randoms = [v / v.norm() for v in torch.randn(n_random, d, generator=g)]
    matched = matched_features(freq, features, n_matched, seed)
    directions: dict[str, list[tuple[str, torch.Tensor]]] = {
        "special": [(f"feature {f}", steering_direction(sae, f, "unit")) for f in features],
        "random_direction": [(f"random {i}", v) for i, v in enumerate(randoms)],
        "matched_feature": [(f"feature {f}", steering_direction(sae, f, "unit")) for f in matched]}
    clean = reply_loglik(model, convs, batch_size)
    per_direction: list[dict[str, Any]] = []
    deltas: dict[tuple[str, float], np.ndarray] = {}
    alpha0_exact = True
    for group, dirs in directions.items():
        for alpha in alphas:
            stack = []
            for label, v in dirs:
                if alpha == 0 and group != "special":
                    ll = clean  # alpha 0 adds exactly zero: checked on the special features below
                else:
                    with steering(model, SteeringSpec(layer=layer, direction=v, alpha=float(alpha), positions=positions,
                                                      special_ids=special_ids)):
                        ll = reply_loglik(model, convs, batch_size)
                    if alpha == 0:
                        alpha0_exact &= bool(np.array_equal(ll, clean))
                stack.append(ll - clean)
                per_direction.append({"group": group, "direction": label, "alpha": float(alpha),
                                      **_stat(ll - clean)})
            deltas[(group, float(alpha))] = (np.mean(stack, axis=0) if stack else np.full(len(convs), np.nan))
    rows = []
    for alpha in alphas:
        a = float(alpha)
        row: dict[str, Any] = {"alpha": a}
        for group in GROUPS:
            row[group] = _stat(deltas[(group, a)]) if directions[group] else {"mean": None, "se": None}
        for control in ("random_direction", "matched_feature"):
            row[f"special_minus_{control}"] = (_stat(deltas[("special", a)] - deltas[(control, a)])
                                               if directions[control] and directions["special"]
                                               else {"mean": None, "se": None})
        rows.append(row)
    return {"n_conversations": len(convs), "reply_tokens": reply_tokens,
            "mean_reply_length": float(np.mean([len(c.reply) for c in convs])),
            "mean_context_length": float(np.mean([len(c.context) for c in convs])),
            "sequences": [c.sequence for c in convs], "positions": positions, "layer": layer,
            "clean_loglik": _stat(clean), "alphas": [float(x) for x in alphas], "alpha0_identical": alpha0_exact,
            "features": list(features), "matched_features": matched,
            "matched_frequencies": {str(f): float(freq[f]) for f in matched},
            "feature_frequencies": {str(f): float(freq[f]) for f in features},
            "n_random_directions": n_random, "seed": seed, "rows": rows, "per_direction": per_direction}
