"""Chat-structure labels for the probes, built from the cache's token arrays alone (no model, no SAE).

Why these labels: an instruct model has to track who is speaking, where the template's markers
are and where a reply begins; a feature dictionary of that model should carry those facts in few
latents. The cache already stores every fact needed (roles, token ids, positions, doc ids,
sequences: cache_layout.md), so the labels cost nothing to build.

Every label is built on the headline ★ tokens of the eval selection (``reconstruction.TokenView``:
no position 0, no token prefix shared by every eval sequence) and split into train and test **by
document** (doc id): a seeded ``test_fraction`` of the documents holding ★ tokens is the test set,
so no conversation has tokens on both sides. Each label becomes one or more binary tasks:

- ``user_vs_assistant``: user content (positive) against assistant content, controlled for the
  words: only token ids that occur in both user and assistant content of the eval tokens, and in
  each split, per token id, as many user as assistant tokens (a seeded sample of the larger side).
  Token identity alone then scores exactly chance. Not controlled: position in the conversation
  (assistant turns follow user turns) and the neighbouring words.
- ``special_token``: which special or template token (roles BOS / special / template / separator)
  this is, one-vs-rest: one task per token id with at least ``min_class_tokens`` tokens in train
  and in test, the other special/template tokens as negatives; the label's score is the mean over
  its tasks. One-vs-rest rather than multinomial because SAEBench's sparse probing is binary (a
  top-k latent set per class, chosen by class-mean difference), so k means the same for every label.
- ``reply_start``: assistant content only; the first ``reply_tokens`` tokens of each assistant turn
  (positive) against its later tokens. A turn whose start is not in its sequence (a BT block that
  begins mid-reply) is left out. Not controlled: the words replies tend to begin with.
A task needs ``min_class_tokens`` tokens of each class in train and in test, else it is skipped
with the reason.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fast_sae.actcache import SPECIAL_ROLES, ActivationCache, Role

from .reconstruction import TokenView
from .sources import EvalSelection
from .token_filters import HEADLINE_FILTER

LABELS: dict[str, str] = {
    "user_vs_assistant": "user content vs assistant content, same token ids, balanced per token id",
    "special_token": "which special/template token (one-vs-rest per token id, mean over token ids)",
    "reply_start": "first {m} tokens of an assistant turn vs its later tokens",
}


@dataclass
class ProbeTask:
    """One binary task: indices into ``ProbeData.rows`` and boolean labels, per split."""

    label: str
    name: str
    positive: str
    negative: str
    train: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    n_train_docs: int
    n_test_docs: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "positive": self.positive, "negative": self.negative,
                "n_train": int(len(self.train)), "n_test": int(len(self.test)),
                "n_train_positive": int(self.y_train.sum()), "n_test_positive": int(self.y_test.sum()),
                "positive_share_test": float(self.y_test.mean()), "n_train_docs": self.n_train_docs,
                "n_test_docs": self.n_test_docs}


@dataclass
class ProbeData:
    """Every task of one eval selection, over one shared pool of tokens (``rows``: cache indices)."""

    rows: np.ndarray
    tasks: list[ProbeTask]
    labels: dict[str, dict[str, Any]]  # label -> what, token / doc counts, skipped reason
    split: dict[str, Any]
    label_rows: dict[str, np.ndarray] = field(default_factory=dict)  # label -> its tokens (indices into rows)


def split_documents(docs: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test mask over ``docs``, the test doc ids): a seeded ``test_fraction`` of the distinct documents,
    at least one and never all."""
    uniq = np.unique(docs)
    if len(uniq) < 2:
        return np.zeros(len(docs), dtype=bool), uniq[:0]
    n_test = min(len(uniq) - 1, max(1, int(round(test_fraction * len(uniq)))))
    test_docs = np.sort(np.random.default_rng(seed).permutation(uniq)[:n_test])
    return np.isin(docs, test_docs), test_docs


def balance_per_token(positions: np.ndarray, ids: np.ndarray, positive: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """The subset of ``positions`` with, per token id, as many positive as negative tokens (a random
    sample of the larger side; ids present on one side only drop out)."""
    if len(positions) == 0:
        return positions
    tid, pos = ids[positions], positive[positions]
    uniq, inv = np.unique(tid, return_inverse=True)
    n_pos = np.bincount(inv, weights=pos, minlength=len(uniq))
    n_neg = np.bincount(inv, weights=~pos, minlength=len(uniq))
    quota = np.minimum(n_pos, n_neg)[inv]
    key = inv * 2 + pos  # one group per (token id, side)
    order = np.lexsort((rng.random(len(key)), key))  # by group, random inside
    sorted_key = key[order]
    rank = np.arange(len(key)) - np.searchsorted(sorted_key, sorted_key, side="left")
    chosen = order[rank < quota[order]]
    return np.sort(positions[chosen])


def _reply_offsets(roles: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token (view order): its offset inside its assistant turn, and whether that turn's start is
    missing from the sequence (the turn runs from position 0)."""
    n = len(roles)
    is_a = roles == int(Role.ASSISTANT)
    prev_a = np.r_[False, is_a[:-1]] & (positions != 0)
    start = is_a & ~prev_a
    start_at = np.maximum.accumulate(np.where(start, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    return np.arange(n) - start_at, positions[start_at] == 0


def _task(label: str, name: str, positive: str, negative: str, cand: np.ndarray, y: np.ndarray,
          is_test: np.ndarray, docs: np.ndarray, min_class: int) -> ProbeTask | str:
    """A task over the view positions ``cand`` (labels ``y`` over the whole view), or why it is skipped."""
    train, test = cand[~is_test[cand]], cand[is_test[cand]]
    counts = {"train positive": int(y[train].sum()), "train negative": int((~y[train]).sum()),
              "test positive": int(y[test].sum()), "test negative": int((~y[test]).sum())}
    short = [f"{k} {v}" for k, v in counts.items() if v < min_class]
    if short:
        return f"fewer than {min_class} tokens: " + ", ".join(short)
    return ProbeTask(label=label, name=name, positive=positive, negative=negative, train=train, test=test,
                     y_train=y[train], y_test=y[test], n_train_docs=int(len(np.unique(docs[train]))),
                     n_test_docs=int(len(np.unique(docs[test]))))


def build_tasks(cache: ActivationCache, selection: EvalSelection, *, test_fraction: float = 0.3, seed: int = 0,
                reply_tokens: int = 3, min_class_tokens: int = 10,
                render: Callable[[int], str] = lambda i: f"<{i}>") -> ProbeData:
    """The probe tasks of ``selection`` (module docstring); ``render`` names token ids in the report."""
    view = TokenView.of(cache, selection)
    index = selection.token_index()
    keep = view.keep[HEADLINE_FILTER]
    roles = view.roles
    ids = cache.token_ids()[index].astype(np.int64)
    docs = cache.doc_ids()[index].astype(np.int64)
    positions = cache.positions()[index].astype(np.int64)
    _, test_docs = split_documents(docs[keep], test_fraction, seed)
    is_test_view = np.isin(docs, test_docs)
    n_docs = int(len(np.unique(docs[keep])))
    split = {"by": "doc_id", "test_fraction": test_fraction, "seed": seed, "n_docs": n_docs,
             "n_test_docs": int(len(test_docs)), "token_filter": HEADLINE_FILTER,
             "shared_prefix_length": view.prefix_length, "n_tokens": int(keep.sum())}
    tasks: list[ProbeTask] = []
    labels: dict[str, dict[str, Any]] = {}
    label_pos: dict[str, np.ndarray] = {}
    rng = np.random.default_rng([seed, 1])

    def add(label: str, made: list[ProbeTask | str], tokens: np.ndarray, extra: dict[str, Any]) -> None:
        ok = [t for t in made if isinstance(t, ProbeTask)]
        skipped = [t for t in made if isinstance(t, str)]
        tasks.extend(ok)
        label_pos[label] = np.unique(np.concatenate([np.r_[t.train, t.test] for t in ok])) if ok else tokens[:0]
        labels[label] = {"what": LABELS[label].format(m=reply_tokens), "n_tasks": len(ok),
                         "skipped": None if ok else (skipped[0] if skipped else "no such tokens"), **extra}

    if n_docs < 2:
        for label in LABELS:
            labels[label] = {"what": LABELS[label].format(m=reply_tokens), "n_tasks": 0,
                             "skipped": f"{n_docs} document(s) with ★ tokens; a by-document split needs 2"}
        return ProbeData(rows=index[:0], tasks=[], labels=labels, split=split)

    # user vs assistant content, same token ids, balanced per token id in each split
    user, asst = keep & (roles == int(Role.USER)), keep & (roles == int(Role.ASSISTANT))
    shared = np.intersect1d(ids[user], ids[asst])
    cand_all = np.flatnonzero((user | asst) & np.isin(ids, shared))
    cand = np.sort(np.r_[balance_per_token(cand_all[~is_test_view[cand_all]], ids, user, rng),
                        balance_per_token(cand_all[is_test_view[cand_all]], ids, user, rng)])
    add("user_vs_assistant", [_task("user_vs_assistant", "user_vs_assistant", "user", "assistant", cand, user,
                                    is_test_view, docs, min_class_tokens)], cand,
        {"n_shared_token_ids": int(len(shared))})

    # which special/template token: one-vs-rest per token id
    special = np.flatnonzero(keep & np.isin(roles, [int(r) for r in SPECIAL_ROLES]))
    made: list[ProbeTask | str] = []
    classes = []
    for tok in np.unique(ids[special]):
        y = ids == tok
        made.append(_task("special_token", f"special_token:{int(tok)}", render(int(tok)), "other special/template",
                          special, y, is_test_view, docs, min_class_tokens))
        classes.append({"token_id": int(tok), "token": render(int(tok)), "n": int(y[special].sum()),
                        "probed": isinstance(made[-1], ProbeTask)})
    add("special_token", made, special, {"classes": classes})

    # first tokens of a reply vs the rest of it
    offset, clipped = _reply_offsets(roles, positions)
    reply = np.flatnonzero(asst & ~clipped)
    add("reply_start", [_task("reply_start", "reply_start", f"first {reply_tokens} tokens of the turn",
                              "later tokens", reply, offset < reply_tokens, is_test_view, docs, min_class_tokens)],
        reply, {"reply_tokens": reply_tokens, "n_turns": int(((offset == 0) & asst & ~clipped).sum())})

    used = np.unique(np.concatenate([np.r_[t.train, t.test] for t in tasks])) if tasks else index[:0]
    for t in tasks:  # view positions -> indices into the shared row pool
        t.train, t.test = np.searchsorted(used, t.train), np.searchsorted(used, t.test)
    return ProbeData(rows=index[used], tasks=tasks, labels=labels, split=split,
                     label_rows={k: np.searchsorted(used, v) for k, v in label_pos.items()})
