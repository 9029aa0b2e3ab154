"""The study's tables and plots, read back from the evaluations' report.json files.

Why mean ± sd over seeds and a "beyond the seed spread" flag: with one seed a gap between regimes
cannot be told from the variation between two trainings of the same regime. A gap is called
larger than the seed spread when every seed of one regime beats every seed of the other (the seed
ranges do not overlap); Welch's t is printed beside it. Metrics are on raw activations, log2 of
the paper's eq.-7 MSE, on the ★ filter (no position 0, no shared template prefix, token_filters.py)
and on all tokens; "special" is the paper's MSE_st positions, "content" the message text.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .plan import EVAL_CACHES, REGIMES, ConvergeConfig, Run, eval_folder

FILTERS = {"star": "subsets_no_prefix", "all_tokens": "subsets"}
FORMATS = tuple(EVAL_CACHES)  # eval formats: fast, bt-f, bt-p
LABEL = {"fast": "FAST", "bt-f": "BT(F)", "bt-p": "BT(P)"}
CONVERGED_DROP = 0.05
PROBE_LABELS = ("user_vs_assistant", "special_token", "reply_start")  # evaluate/probes.py
PROBE_K = (1, 5, 20)  # held-out ★ MSE changed by less than this from one budget to the next


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)) else math.nan


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The figures the study keeps of one report row (one SAE on one eval cache)."""
    out: dict[str, float] = {}
    for tag, key in FILTERS.items():
        for subset in ("all", "special", "content"):
            out[f"{tag}.{subset}.log2_mse"] = _num(_get(row, f"reconstruction.{key}.{subset}.log2_mse"))
        out[f"{tag}.l0"] = _num(_get(row, f"reconstruction.{key}.all.l0"))
        out[f"{tag}.fve"] = _num(_get(row, f"reconstruction.{key}.all.explained_variance"))
    for label in PROBE_LABELS:
        for k in PROBE_K:
            out[f"probe.{label}.k{k}"] = _num(_get(row, f"probes.labels.{label}.k.{k}.balanced_accuracy"))
        out[f"probe.{label}.dense"] = _num(_get(row, f"probes.labels.{label}.dense.balanced_accuracy"))
    out["dead_fraction"] = _num(_get(row, "reconstruction.dead_fraction"))
    plateaued = _get(row, "training.plateaued")
    out["plateaued"] = math.nan if plateaued is None else float(bool(plateaued))
    out["train_mse_drop_second_half"] = _num(_get(row, "training.mse_drop_second_half"))
    return out


def collect(c: ConvergeConfig, runs: list[Run]) -> list[dict[str, Any]]:
    """One record per (SAE, eval format) of every evaluated run; the format "fit" is the run's own
    training cache (seen documents)."""
    records = []
    for run in runs:
        for kind in ("heldout", "fit"):
            f = eval_folder(c, run, kind) / "report.json"
            if not f.is_file():
                continue
            rows = json.loads(f.read_text()).get("rows") or []
            for row in rows:
                fmt = "fit" if kind == "fit" else row.get("eval_label") or row.get("eval_regime")
                records.append({"part": run.part, "regime": run.regime, "seed": run.seed,
                                "tokens_per_latent": run.tokens_per_latent, "architecture": row.get("architecture"),
                                "sae": row.get("name"), "format": fmt, "training_tokens": _get(row, "training.tokens"),
                                **row_metrics(row)})
    return records


def _stats(values: list[float]) -> dict[str, Any]:
    v = np.array([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "values": [float(x) for x in v]}


def cells(records: list[dict[str, Any]]) -> dict[tuple[str, str, float, str], dict[str, dict[str, Any]]]:
    """(architecture, regime, tokens per latent, format) -> metric -> stats over seeds."""
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["architecture"], r["regime"], r["tokens_per_latent"], r["format"])].append(r)
    out = {}
    for key, rs in groups.items():
        metrics = [m for m in rs[0] if "." in m or m in ("dead_fraction", "plateaued", "train_mse_drop_second_half")]
        # a probe label skipped on one cache (e.g. no chat roles in BT(P) text) is nan: n = 0 there
        out[key] = {m: _stats([r[m] for r in rs]) for m in metrics}
        out[key]["seeds"] = {"values": sorted(r["seed"] for r in rs)}
    return out


def gap(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """b − a (BT minus FAST: positive = FAST lower MSE), with Welch's t and whether the seed ranges part."""
    if not a.get("n") or not b.get("n"):
        return None
    d = b["mean"] - a["mean"]
    sa, sb = a.get("sd") or 0.0, b.get("sd") or 0.0
    se = math.sqrt(sa ** 2 / a["n"] + sb ** 2 / b["n"])
    apart = (a["max"] < b["min"] or b["max"] < a["min"]) and min(a["n"], b["n"]) > 1
    return {"diff": d, "se": se, "welch_t": d / se if se > 0 else None, "beyond_seed_spread": bool(apart),
            "n": [a["n"], b["n"]]}


def gaps(table: dict[tuple[str, str, float, str], dict[str, dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """FAST against each BT regime, per (architecture, budget, format), on ``metric``."""
    out = []
    for (arch, regime, tpl, fmt), st in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3])):
        if regime != "fast" or fmt == "fit":  # each regime's fit is on its own training cache: no common tokens
            continue
        for other in ("bt-f", "bt-p"):
            o = table.get((arch, other, tpl, fmt))
            g = gap(st[metric], o[metric]) if o else None
            if g is not None:
                out.append({"architecture": arch, "tokens_per_latent": tpl, "format": fmt, "versus": other,
                            "metric": metric, **g})
    return out


def held_out_convergence(table: dict[tuple[str, str, float, str], dict[str, dict[str, Any]]],
                         metric: str = "star.all.log2_mse") -> list[dict[str, Any]]:
    """Per (architecture, regime): held-out MSE (own format) at each budget and its change from the
    previous budget; converged where doubling the budget changed the MSE by < CONVERGED_DROP."""
    by: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (arch, regime, tpl, fmt), st in table.items():
        if fmt == regime and st[metric]["mean"] is not None:
            by[(arch, regime)].append((tpl, st[metric]["mean"]))
    out = []
    for (arch, regime), pts in sorted(by.items()):
        pts.sort()
        for (t0, m0), (t1, m1) in zip(pts, pts[1:]):
            change = 2 ** (m1 - m0) - 1  # relative MSE change (log2 values)
            out.append({"architecture": arch, "regime": regime, "from": t0, "to": t1, "log2_mse_from": m0,
                        "log2_mse_to": m1, "relative_change": change, "converged": abs(change) < CONVERGED_DROP})
    return out


Table = dict[tuple[str, str, float, str], dict[str, dict[str, Any]]]


def summarize(c: ConvergeConfig, runs: list[Run]) -> tuple[dict[str, Any], Table]:
    records = collect(c, runs)
    table = cells(records)
    keyed = {f"{a}|{r}|{t:g}|{f}": v for (a, r, t, f), v in table.items()}
    return {"config": {"seeds": c.seeds, "k": c.k, "expansion_factor": c.expansion_factor,
                       "core_tokens_per_latent": c.core_tokens_per_latent, "tokens_per_latent": c.tokens_per_latent,
                       "batch_tokens": c.batch_tokens, "lr": c.lr},
            "n_records": len(records), "records": records, "cells": keyed,
            "gaps": {m: gaps(table, m) for m in ("star.special.log2_mse", "star.content.log2_mse",
                                                 "all_tokens.special.log2_mse", "star.all.log2_mse")},
            "held_out_convergence": held_out_convergence(table)}, table


def _fmt(st: dict[str, Any] | None, digits: int = 2, pct: bool = False) -> str:
    if not st or st.get("mean") is None:
        return "–"
    k = 100.0 if pct else 1.0
    sd = st.get("sd")
    body = f"{st['mean'] * k:.{digits}f}" + (f" ± {sd * k:.{digits}f}" if sd is not None else "")
    return body + ("%" if pct else "")


def _budgets(table: dict[tuple[str, str, float, str], Any]) -> list[float]:
    return sorted({k[2] for k in table})


def markdown(c: ConvergeConfig, summary: dict[str, Any], table: dict[tuple[str, str, float, str], Any],
             plots: list[str], sweeps_md: str | None) -> str:
    budgets = _budgets(table)
    core = c.core_tokens_per_latent if c.core_tokens_per_latent in budgets else (budgets[-1] if budgets else None)
    lines = ["# FAST vs BT at convergence: seeds, training length, cross-evaluation", "",
             f"SAEs of width {c.expansion_factor} × d_model, k = {c.k} (TopK, BatchTopK), seeds {c.seeds}; budgets "
             f"in training tokens per latent {', '.join(f'{b:g}' for b in budgets)} (paper: 1,430). log2 of the "
             "paper's MSE (eq. 7) on raw activations, mean ± sd over seeds. ★ = without position 0 and without "
             "the token prefix shared by the eval documents (per document start in BT blocks). Held-out data: "
             "documents no training cache holds (checked from doc ids).", ""]
    if core is not None:
        lines += [f"## Held-out FAST conversations, {core:g} tokens per latent", "",
                  "| arch | trained on | seeds | L0 ★ | MSE_st ★ | content ★ | all roles ★ | MSE_st all tok. | "
                  "FVE ★ | dead % | plateau met |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch in ("topk", "batchtopk"):
            for regime in REGIMES:
                st = table.get((arch, regime, core, "fast"))
                if not st:
                    continue
                pl = st["plateaued"]
                plateau = f"{int(round(pl['mean'] * pl['n']))}/{pl['n']}" if pl["n"] else "–"
                lines.append(f"| {arch} | {LABEL[regime]} | {st['star.l0']['n']} | {_fmt(st['star.l0'], 1)} | "
                             f"{_fmt(st['star.special.log2_mse'])} | {_fmt(st['star.content.log2_mse'])} | "
                             f"{_fmt(st['star.all.log2_mse'])} | {_fmt(st['all_tokens.special.log2_mse'])} | "
                             f"{_fmt(st['star.fve'], 3)} | {_fmt(st['dead_fraction'], 1, pct=True)} | {plateau} |")
        lines.append("")
    lines += ["## The gap against training length (held-out FAST conversations, ★)", "",
              "BT minus FAST in log2 MSE (positive: FAST lower); ± is the standard error of the difference; "
              "**beyond** = every seed of one regime beats every seed of the other.", "",
              "| arch | tokens/latent | vs | MSE_st ★ gap | content ★ gap |", "|---|---|---|---|---|"]
    sp = {(g["architecture"], g["tokens_per_latent"], g["format"], g["versus"]): g
          for g in summary["gaps"]["star.special.log2_mse"]}
    ct = {(g["architecture"], g["tokens_per_latent"], g["format"], g["versus"]): g
          for g in summary["gaps"]["star.content.log2_mse"]}

    def gtxt(g: dict[str, Any] | None) -> str:
        if g is None:
            return "–"
        return f"{g['diff']:+.2f} ± {g['se']:.2f}" + (" **beyond**" if g["beyond_seed_spread"] else "")

    for arch in ("topk", "batchtopk"):
        for tpl in budgets:
            for other in ("bt-f", "bt-p"):
                key = (arch, tpl, "fast", other)
                if key in sp or key in ct:
                    lines.append(f"| {arch} | {tpl:g} | {LABEL[other]} | {gtxt(sp.get(key))} | {gtxt(ct.get(key))} |")
    lines.append("")
    if core is not None:
        lines += [f"## Cross-evaluation at {core:g} tokens per latent: SAE regime × eval format (★ log2 MSE, "
                  "special / content)", "",
                  "| arch | trained on | " + " | ".join(f"eval {LABEL[f]}" for f in FORMATS) + " |",
                  "|---|---|" + "---|" * len(FORMATS)]
        for arch in ("topk", "batchtopk"):
            for regime in REGIMES:
                cellsx = []
                for fmt in FORMATS:
                    st = table.get((arch, regime, core, fmt))
                    cellsx.append("–" if not st else f"{_fmt(st['star.special.log2_mse'])} / "
                                                     f"{_fmt(st['star.content.log2_mse'])}")
                lines.append(f"| {arch} | {LABEL[regime]} | " + " | ".join(cellsx) + " |")
        lines += ["", "Best per eval format (lowest ★ content MSE, mean over seeds):", ""]
        for arch in ("topk", "batchtopk"):
            for fmt in FORMATS:
                vals = {r: table[(arch, r, core, fmt)]["star.content.log2_mse"]["mean"] for r in REGIMES
                        if (arch, r, core, fmt) in table and table[(arch, r, core, fmt)]["star.content.log2_mse"][
                            "mean"] is not None}
                if vals:
                    best = min(vals, key=lambda r: vals[r])
                    lines.append(f"- {arch}, eval {LABEL[fmt]}: {LABEL[best]}")
        lines.append("")
    if core is not None and any((a, r, core, "fast") in table and table[(a, r, core, "fast")].get(
            f"probe.{PROBE_LABELS[0]}.k1", {}).get("n") for a in ("topk", "batchtopk") for r in REGIMES):
        lines += [f"## Chat-structure probes on held-out FAST conversations, {core:g} tokens per latent",
                  "", "Balanced test accuracy (chance 0.5) of SAEBench-style k-latent probes (docs/metrics.md), ★ "
                  "tokens, split by conversation; mean ± sd over seeds. TopK is at L0 32 in every regime; "
                  "BatchTopK's ★ L0 differs by regime (first table).", "",
                  "| arch | trained on | " + " | ".join(f"{lab} k={k}" for lab in PROBE_LABELS for k in (1, 20))
                  + " |", "|---|---|" + "---|" * (2 * len(PROBE_LABELS))]
        for arch in ("topk", "batchtopk"):
            for regime in REGIMES:
                st = table.get((arch, regime, core, "fast"))
                if st:
                    lines.append(f"| {arch} | {LABEL[regime]} | " + " | ".join(
                        _fmt(st.get(f"probe.{lab}.k{k}"), 3) for lab in PROBE_LABELS for k in (1, 20)) + " |")
        dense = table.get(("topk", "fast", core, "fast"))
        if dense:
            lines += ["", "Dense-residual probe (the ceiling, same tokens): " + ", ".join(
                f"{lab} {_fmt(dense.get(f'probe.{lab}.dense'), 3)}" for lab in PROBE_LABELS), ""]
        lines.append("")
    lines += ["## Memorisation: training documents vs held-out documents of the same format (★ log2 MSE, all roles)",
              "", "| arch | trained on | tokens/latent | seen (training cache) | held-out | held-out − seen |",
              "|---|---|---|---|---|---|"]
    for arch in ("topk", "batchtopk"):
        for regime in REGIMES:
            for tpl in budgets:
                fit, held = table.get((arch, regime, tpl, "fit")), table.get((arch, regime, tpl, regime))
                if fit and held and fit["star.all.log2_mse"]["mean"] is not None and \
                        held["star.all.log2_mse"]["mean"] is not None:
                    d = held["star.all.log2_mse"]["mean"] - fit["star.all.log2_mse"]["mean"]
                    lines.append(f"| {arch} | {LABEL[regime]} | {tpl:g} | {_fmt(fit['star.all.log2_mse'])} | "
                                 f"{_fmt(held['star.all.log2_mse'])} | {d:+.2f} |")
    lines += ["", f"## Held-out convergence: ★ MSE (own format) from one budget to the next (converged: |change| < "
                  f"{CONVERGED_DROP:.0%})", "",
              "| arch | trained on | from → to tokens/latent | MSE change | converged |", "|---|---|---|---|---|"]
    for h in summary["held_out_convergence"]:
        lines.append(f"| {h['architecture']} | {LABEL[h['regime']]} | {h['from']:g} → {h['to']:g} | "
                     f"{h['relative_change']:+.1%} | {'yes' if h['converged'] else 'no'} |")
    lines.append("")
    if plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if sweeps_md:
        lines += ["## Standard and JumpReLU: frontiers at matched L0 (`pipeline.py compare` of the sweeps)", "",
                  sweeps_md, ""]
    return "\n".join(lines)


def plot_gap_vs_tokens(table: dict[tuple[str, str, float, str], Any], out: Path) -> list[str]:
    """Held-out FAST ★ log2 MSE per regime against training tokens (mean ± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = _budgets(table)
    if not budgets:
        return []
    metrics = [("star.special.log2_mse", "MSE_st ★"), ("star.content.log2_mse", "content MSE ★")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for i, arch in enumerate(("topk", "batchtopk")):
        for j, (m, title) in enumerate(metrics):
            ax = axes[i][j]
            for regime in REGIMES:
                pts = [(t, table[(arch, regime, t, "fast")][m]) for t in budgets if (arch, regime, t, "fast") in table]
                pts = [(t, s) for t, s in pts if s["mean"] is not None]
                if not pts:
                    continue
                ax.errorbar([t for t, _ in pts], [s["mean"] for _, s in pts], yerr=[s["sd"] or 0 for _, s in pts],
                            marker="o", capsize=3, label=LABEL[regime])
            ax.set_xscale("log")
            ax.set_title(f"{arch}: {title}, held-out FAST")
            ax.set_xlabel("training tokens per latent")
            ax.set_ylabel("log2 MSE (mean ± sd over seeds)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mse_vs_tokens.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def plot_gaps(summary: dict[str, Any], out: Path) -> list[str]:
    """Each FAST–BT gap (BT minus FAST, log2 MSE ★ on held-out FAST conversations) against training
    tokens, ± its standard error over seeds; above 0 = FAST better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("star.special.log2_mse", "MSE_st ★"), ("star.content.log2_mse", "content MSE ★")]
    if not any(summary["gaps"][m] for m, _ in metrics):
        return []
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for i, arch in enumerate(("topk", "batchtopk")):
        for j, (m, title) in enumerate(metrics):
            ax = axes[i][j]
            for other in ("bt-f", "bt-p"):
                pts = sorted((g["tokens_per_latent"], g["diff"], g["se"]) for g in summary["gaps"][m]
                             if g["architecture"] == arch and g["versus"] == other and g["format"] == "fast")
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, label=f"{LABEL[other]} − FAST")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{arch}: {title} gap, held-out FAST")
            ax.set_xlabel("training tokens per latent")
            ax.set_ylabel("Δ log2 MSE (> 0: FAST lower)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gaps_vs_tokens.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
