"""The chat-structure probes in tables: report.md's section and compare's matched-L0 comparison.

Why apart from probes.py: report and compare read report.json rows written by earlier runs, so
these functions need only the rows' ``probes`` records (probes.probe_layer), never the probe code.
In compare the regimes are matched at equal L0 exactly as for the MSE (frontier.match_at_l0:
each regime's SAEs joined linearly in (ln L0, accuracy), never extrapolated), with L0 measured
on the label's own probe tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .frontier import match_at_l0, regime_order
from .report import _get, fmt, markdown_table

LABEL_ORDER = ("user_vs_assistant", "special_token", "reply_start")
METRIC = "balanced_accuracy"

INTRO = ("SAEBench-style sparse probing on labels the cache holds, model-free: per task, the top-k latents by "
         "|class-mean difference| on the training tokens, then an L2 logistic regression on them (standardised, "
         "class-balanced, C = 1), scored on the test tokens; the dense ceiling is the same regression on the whole "
         "residual. ★ tokens only; train and test are disjoint sets of documents. Figures are balanced accuracy "
         "(chance = 0.5); `special_token` is the mean over its one-vs-rest tasks. SE: the token-level binomial "
         "standard error of a balanced accuracy of 0.5 on the test tokens, a lower bound on the noise (tokens of one "
         "conversation are correlated). L0: mean active latents on the label's probe tokens. Labels and limits: "
         "docs/metrics.md.")


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen = {label for r in rows for label in (_get(r, "probes.labels") or {})}
    return [label for label in LABEL_ORDER if label in seen] + sorted(seen - set(LABEL_ORDER))


def _facts_table(row: dict[str, Any]) -> list[str]:
    """The tokens, documents and dense ceiling of one eval cache's labels (the same for every SAE)."""
    p = row["probes"]
    split = p["split"]
    lines = [f"Eval cache `{row.get('eval_cache')}` (layer {p['layer']}): {split['n_docs']} documents with ★ tokens, "
             f"{split['n_test_docs']} of them in the test split (seed {split['seed']}); shared prefix "
             f"{split['shared_prefix_length']} tokens left out.", "",
             "| label | what | train / test tokens | train / test docs | positive share (test) | SE | dense ceiling "
             "| note |", "|---|---|---|---|---|---|---|---|"]
    for label in _labels([row]):
        e = p["labels"][label]
        tasks = e.get("tasks") or []
        if not tasks:
            lines.append(f"| {label} | {e['what']} | – | – | – | – | – | skipped: {e.get('skipped')} |")
            continue
        share = " / ".join(f"{t['positive_share_test']:.2f}" for t in tasks)
        note = ""
        if label == "special_token":
            note = "classes: " + ", ".join(f"`{t['positive']!r}`" for t in tasks)
        lines.append(f"| {label} | {e['what']} | {e['n_train_tokens']} / {e['n_test_tokens']} | "
                     f"{tasks[0]['n_train_docs']} / {tasks[0]['n_test_docs']} | {share} | {fmt(e.get('se'), '.3f')} | "
                     f"{fmt(_get(e, 'dense.' + METRIC), '.3f')} | {note} |")
    return lines


def report_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """report.md's probe section: per eval cache the labels' facts, per label a table of every SAE."""
    probed = [r for r in rows if r.get("probes")]
    if not probed:
        return []
    parts = ["## Chat-structure probes (★ tokens, held-out documents)", "", INTRO, ""]
    firsts: dict[str, dict[str, Any]] = {}
    for r in probed:
        firsts.setdefault(str(r.get("eval_cache")), r)
    for r in firsts.values():
        parts += _facts_table(r) + [""]
    ks = probed[0]["probes"]["k"]
    for label in _labels(probed):
        base = f"probes.labels.{label}"
        cols = [("SAE", "name", "s"), ("eval on", "eval_regime", "s"), ("L0", f"{base}.l0", ".1f")]
        cols += [(f"k={k}", f"{base}.k.{k}.{METRIC}", ".3f") for k in ks]
        cols += [("dense", f"{base}.dense.{METRIC}", ".3f")]
        parts += [f"### {label}", "", markdown_table(list(probed), cols), ""]
    seconds = [_get(r, "probes.seconds") for r in probed]
    parts += [f"Probing took {sum(seconds):.1f} s for {len(probed)} SAE evaluation(s) "
              f"(+ {sum(_get(r, 'probes.dense_seconds') or 0 for r in firsts.values()):.1f} s for the labels and "
              f"dense ceilings).", ""]
    return parts


def matched_probes(by_regime: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (label, k): the regimes' balanced accuracy at common L0 values (higher is better) and the dense
    ceiling of the group's tokens."""
    rows = [r for rs in by_regime.values() for r in rs if r.get("probes")]
    if not rows:
        return []
    out = []
    for label in _labels(rows):
        for k in rows[0]["probes"]["k"]:
            points: dict[str, list[tuple[float, float]]] = {}
            for regime in regime_order(list(by_regime)):
                pts: dict[float, list[float]] = {}
                for r in by_regime[regime]:
                    l0 = _get(r, f"probes.labels.{label}.l0")
                    acc = _get(r, f"probes.labels.{label}.k.{k}.{METRIC}")
                    if isinstance(l0, (int, float)) and l0 > 0 and isinstance(acc, (int, float)):
                        pts.setdefault(float(l0), []).append(float(acc))
                points[regime] = [(x, sum(v) / len(v)) for x, v in sorted(pts.items())]
            dense = next((d for r in rows if (d := _get(r, f"probes.labels.{label}.dense.{METRIC}")) is not None),
                         None)
            se = max((s for r in rows if isinstance(s := _get(r, f"probes.labels.{label}.se"), (int, float))),
                     default=0.0)
            out.append({"label": label, "k": k, "metric": METRIC, "dense": dense, "se": se}
                       | match_at_l0(points, True, margin=se))
    return out


def compare_lines(group: dict[str, Any]) -> list[str]:
    """compare.md's probe table of one group: one row per (label, k), each regime's values at the matched L0s."""
    table = group.get("probes") or []
    if not table:
        return []
    regimes = list(group["regimes"])
    lines = ["### Chat-structure probes at matched L0", "",
             "Balanced test accuracy (chance 0.5) of k-latent probes, each regime interpolated at the same L0 "
             "values (L0 on the label's probe tokens; listed left to right; – outside a regime's own range). "
             "ahead: how often each regime is highest by more than SE, the token-level binomial standard error "
             "of a balanced accuracy of 0.5 on the test tokens (a lower bound on the noise: tokens of one "
             "conversation are correlated). ★ tokens, held-out documents; docs/metrics.md.", "",
             "| label | k | L0 | " + " | ".join(regimes) + " | ahead by > SE | SE | dense ceiling |",
             "|---|---|---|" + "---|" * len(regimes) + "---|---|---|"]
    for m in table:
        if not m["l0"]:
            ranges = "; ".join(f"{r} {a:.1f}–{b:.1f}" for r, (a, b) in m["ranges"].items()) or "no points"
            lines.append(f"| {m['label']} | {m['k']} | no common L0 range ({ranges}) |" + " |" * len(regimes)
                         + f" | {fmt(m.get('se'), '.3f')} | {fmt(m['dense'], '.3f')} |")
            continue
        cells = [" · ".join(fmt(v, ".3f") for v in m["values"].get(r, [None] * len(m["l0"]))) for r in regimes]
        wins = ", ".join(f"{r} {sum(b == r for b in m['best'])}/{len(m['l0'])}" for r in regimes
                         if any(b == r for b in m["best"])) or "none"
        lines.append(f"| {m['label']} | {m['k']} | " + " · ".join(f"{x:.1f}" for x in m["l0"]) + " | "
                     + " | ".join(cells) + f" | {wins} | {fmt(m.get('se'), '.3f')} | {fmt(m['dense'], '.3f')} |")
    return lines + [""]
