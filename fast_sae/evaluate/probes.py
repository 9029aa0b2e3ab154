"""Chat-structure probes: SAEBench-style sparse probing of every SAE on labels the cache holds.

Why: reconstruction says how much of the residual an SAE keeps, not whether its latents line up
with what an instruct model must track (who speaks, which template marker, where a reply starts).
Sparse probing measures that without a model and without a judge: if a handful of latents
separate a label on held-out documents, the dictionary has features for it.

Method (SAEBench's sparse probing, on tokens instead of mean-pooled texts):
1. the tasks of ``probe_labels`` (★ tokens, train/test split by document);
2. every SAE encodes the tasks' tokens once (all labels reuse the encoding);
3. per task, on the training tokens: the top-k latents by |mean over positives − mean over
   negatives| of their activations, for each k of ``ProbeConfig.k`` (nested: the top 20 hold the top 5);
4. an L2 logistic regression on those k latents (``logistic.fit_logistic``: standardised,
   class-balanced, C = 1 as in SAEBench), scored on the test tokens: accuracy and balanced
   accuracy (the mean of both classes' recalls; chance is 0.5 whatever the class balance);
5. the ceiling: the same regression on the whole standardised residual (d_model features), fitted
   once per eval cache and layer (the same tokens for every SAE).
Per label the report holds each k's accuracy (a mean over the label's one-vs-rest tasks for
``special_token``), the dense ceiling, the token and document counts and the class balance, and
``l0``: the SAE's mean number of active latents on the label's tokens (compare matches SAEs at
this L0).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fast_sae.actcache import ActivationCache
from fast_sae.options import setting
from fast_sae.saeio import LoadedSAE

from .logistic import accuracies, fit_logistic, one_thread
from .probe_labels import ProbeData, ProbeTask, build_tasks
from .sources import EvalSelection

# latent activations of the row pool kept in memory when rows × d_sae is at most this (else encoded twice)
_KEEP_ELEMENTS = 1 << 26


@dataclass
class ProbeConfig:
    """Chat-structure sparse probes per SAE (evaluate.probes); every field is a `--probe-*` option."""

    enabled: bool = setting(True, flag="probes", help="Chat-structure sparse probes per SAE (model-free, ★ tokens, "
                                                      "train/test split by document; docs/metrics.md).")
    k: list[int] = setting(default_factory=lambda: [1, 2, 5, 20], help="Latents per sparse probe.")
    test_fraction: float = setting(0.3, help="Share of the eval documents in the probes' test split.")
    seed: int = setting(0, help="Seed of the probes' document split and per-token balancing.")
    reply_tokens: int = setting(3, help="reply_start label: the first N tokens of an assistant turn are positive.")
    min_class_tokens: int = setting(10, help="A probe task needs this many tokens of each class in train and in "
                                             "test, else it is skipped.")
    c: float = setting(1.0, help="Inverse L2 strength of the probes' logistic regression (scikit-learn's C; "
                                 "SAEBench uses 1).")
    max_tokens: int = setting(50_000, help="Token cap of the probes: whole eval sequences in stream order "
                                           "(0: no cap); bounds memory at tokens x d_model floats.")
    batch_tokens: int = setting(4096, cli=False, help="Tokens per SAE forward.")
    device: str = setting("cpu", cli=False, help="Set from the evaluation's --device.")
    progress: bool = setting(True, cli=False, help="Set from the evaluation's --progress.")

    def check(self) -> None:
        """One-line errors for values that cannot work."""
        from .errors import EvalError

        if not self.k or min(self.k) < 1:
            raise EvalError("--probe-k: expected positive numbers of latents, e.g. 1,2,5,20")
        if not 0 < self.test_fraction < 1:
            raise EvalError("--probe-test-fraction must lie strictly between 0 and 1")
        if self.reply_tokens < 1 or self.min_class_tokens < 1:
            raise EvalError("--probe-reply-tokens and --probe-min-class-tokens must be at least 1")
        if self.c <= 0:
            raise EvalError("--probe-c must be > 0")
        if self.max_tokens < 0:
            raise EvalError("--probe-max-tokens must be >= 0 (0: no cap)")


def capped(selection: EvalSelection, max_tokens: int) -> EvalSelection:
    """The first whole sequences of ``selection`` holding at most ``max_tokens`` tokens (at least one)."""
    if not max_tokens or selection.n_tokens <= max_tokens:
        return selection
    s = selection.seq_starts
    lengths = s[selection.sequences + 1] - s[selection.sequences]
    keep = max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right")))
    return EvalSelection(sequences=selection.sequences[:keep], seq_starts=s,
                         note=f"{selection.note}; probes capped at {max_tokens} tokens")


def read_rows(cache: ActivationCache, layer: int, rows: np.ndarray, span: int = 8192) -> torch.Tensor:
    """Activations of the sorted cache indices ``rows`` (n, d_model) float32, read in spans of <= ``span``."""
    out = np.empty((len(rows), cache.d_model), np.float32)
    i = 0
    while i < len(rows):
        lo = int(rows[i])
        j = int(np.searchsorted(rows, lo + span, side="left"))
        block = np.asarray(cache.read(layer, lo, int(rows[j - 1]) + 1))
        out[i:j] = block[rows[i:j] - lo]
        i = j
    return torch.from_numpy(out)


def _fit_score(x: torch.Tensor, task: ProbeTask, c: float) -> dict[str, Any]:
    x_train, x_test = x[torch.from_numpy(task.train)], x[torch.from_numpy(task.test)]
    y_train = torch.from_numpy(task.y_train)
    probe = fit_logistic(x_train, y_train, c=c)
    acc, bacc = accuracies(torch.from_numpy(task.y_test), probe.predict(x_test))
    train_acc, _ = accuracies(y_train, probe.predict(x_train))
    return {"accuracy": acc, "balanced_accuracy": bacc, "train_accuracy": train_acc, "converged": probe.converged}


def dense_ceiling(x: torch.Tensor, data: ProbeData, c: float) -> dict[str, dict[str, Any]]:
    """Task name -> the logistic regression on the whole (standardised) residual, scored on its test tokens."""
    with one_thread():
        return {t.name: _fit_score(x, t, c) for t in data.tasks}


@torch.no_grad()
def _encode(sae: LoadedSAE, x: torch.Tensor, batch: int, device: str) -> Iterator[tuple[int, torch.Tensor]]:
    for lo in range(0, len(x), batch):
        yield lo, sae.encode(x[lo:lo + batch].to(device)).float().cpu()


def _top_latents(sae: LoadedSAE, x: torch.Tensor, data: ProbeData, kmax: int, cfg: ProbeConfig
                 ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
    """(top (kmax, n_tasks) latent ids by |class-mean difference| on each task's training tokens, the
    union of those ids, the activations of that union on every row, active latents per row)."""
    n, d_sae = len(x), int(sae.d_sae)
    weights = torch.zeros(n, len(data.tasks), dtype=torch.float64)  # +1/n_pos, −1/n_neg on training tokens
    for j, t in enumerate(data.tasks):
        pos, neg = t.train[t.y_train], t.train[~t.y_train]
        weights[pos, j], weights[neg, j] = 1.0 / len(pos), -1.0 / len(neg)
    diff = torch.zeros(d_sae, len(data.tasks), dtype=torch.float64)
    active = torch.zeros(n)
    kept: list[torch.Tensor] | None = [] if n * d_sae <= _KEEP_ELEMENTS else None
    for lo, f in _encode(sae, x, cfg.batch_tokens, cfg.device):
        diff += f.double().T @ weights[lo:lo + len(f)]
        active[lo:lo + len(f)] = (f > 0).sum(1).float()
        if kept is not None:
            kept.append(f)
    top = torch.sort(diff.abs(), dim=0, descending=True, stable=True).indices[:kmax]
    union = np.unique(top.numpy())
    cols = torch.from_numpy(union)
    if kept is not None:
        chosen = torch.cat(kept)[:, cols]
    else:  # too large to keep: encode again, keeping only the chosen latents
        chosen = torch.cat([f[:, cols] for _, f in _encode(sae, x, cfg.batch_tokens, cfg.device)])
    return top, union, chosen, active


def sparse_probes(sae: LoadedSAE, x: torch.Tensor, data: ProbeData, cfg: ProbeConfig
                  ) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
    """Task name -> {k: scores and the latents used}, and the active latents per row."""
    ks = sorted(set(cfg.k))
    if not data.tasks:
        return {}, torch.zeros(len(x))
    kmax = min(max(ks), int(sae.d_sae))
    top, union, chosen, active = _top_latents(sae, x, data, kmax, cfg)
    out: dict[str, dict[str, Any]] = {}
    with one_thread():  # many small fits: a thread pool only adds synchronisation (logistic.py)
        for j, t in enumerate(data.tasks):
            per_k = {}
            for k in ks:
                ids = top[:min(k, kmax), j].numpy()
                per_k[str(k)] = _fit_score(chosen[:, torch.from_numpy(np.searchsorted(union, ids))], t, cfg.c) | {
                    "latents": [int(i) for i in ids]}
            out[t.name] = per_k
    return out, active


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def label_results(data: ProbeData, scores: dict[str, dict[str, Any]], dense: dict[str, dict[str, Any]],
                  active: torch.Tensor, ks: list[int]) -> dict[str, dict[str, Any]]:
    """Per label: the mean over its tasks per k and for the dense ceiling, L0 on its tokens, and every task."""
    out = {}
    for label, facts in data.labels.items():
        tasks = [t for t in data.tasks if t.label == label]
        rows = data.label_rows.get(label)
        entry: dict[str, Any] = dict(facts)
        entry["l0"] = float(active[rows].mean()) if rows is not None and len(rows) and tasks else None
        entry["k"] = {str(k): {m: _mean([scores[t.name][str(k)][m] for t in tasks])
                               for m in ("accuracy", "balanced_accuracy")} for k in ks} if tasks else {}
        entry["dense"] = {m: _mean([dense[t.name][m] for t in tasks]) for m in ("accuracy", "balanced_accuracy")} \
            if tasks else None
        entry["n_train_tokens"] = sum(len(t.train) for t in tasks) if label != "special_token" else \
            (len(tasks[0].train) if tasks else 0)
        entry["n_test_tokens"] = sum(len(t.test) for t in tasks) if label != "special_token" else \
            (len(tasks[0].test) if tasks else 0)
        entry["tasks"] = [t.describe() | {"k": scores[t.name], "dense": dense[t.name]} for t in tasks]
        # the binomial standard error of a balanced accuracy of 0.5 on the test tokens: a lower bound on the
        # noise of these figures (the tokens of one conversation are not independent)
        entry["se"] = _mean([0.5 * float(np.sqrt(0.25 / t.y_test.sum() + 0.25 / (~t.y_test).sum())) for t in tasks])
        out[label] = entry
    return out


def probe_layer(saes: dict[str, LoadedSAE], cache: ActivationCache, layer: int, selection: EvalSelection,
                cfg: ProbeConfig, render: Callable[[int], str] = lambda i: f"<{i}>") -> dict[str, dict[str, Any]]:
    """SAE name -> its probe results on ``layer`` of ``selection`` (module docstring)."""
    t0 = time.perf_counter()
    sel = capped(selection, cfg.max_tokens)
    data = build_tasks(cache, sel, test_fraction=cfg.test_fraction, seed=cfg.seed, reply_tokens=cfg.reply_tokens,
                       min_class_tokens=cfg.min_class_tokens, render=render)
    x = read_rows(cache, layer, data.rows)
    dense = dense_ceiling(x, data, cfg.c)
    shared_seconds = time.perf_counter() - t0
    head = {"token_filter": data.split["token_filter"], "layer": layer, "k": sorted(set(cfg.k)), "c": cfg.c,
            "split": data.split | {"n_sequences": int(len(sel.sequences)), "n_eval_tokens": sel.n_tokens},
            "method": "SAEBench sparse probing: top-k latents by |class-mean difference| on the training tokens, "
                      "L2 logistic regression (standardised, class-balanced), scored on held-out documents",
            "dense_seconds": round(shared_seconds, 3)}
    out = {}
    for name, sae in tqdm(saes.items(), desc=f"probes layer {layer}", unit="SAE", disable=not cfg.progress,
                          leave=False):
        t = time.perf_counter()
        scores, active = sparse_probes(sae, x, data, cfg)
        labels = label_results(data, scores, dense, active, head["k"])
        fits = [s for per_k in scores.values() for s in per_k.values()] + list(dense.values())
        out[name] = head | {"labels": labels, "n_fits_not_converged": sum(not s["converged"] for s in fits),
                            "seconds": round(time.perf_counter() - t, 3)}
    return out
