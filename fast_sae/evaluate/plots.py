"""PNG figures of a report (matplotlib, Agg backend: no display needed).

Why these four: the MSE–L0 frontier is how SAEs of different sparsity are compared fairly (the
paper's architectures are not at matched L0); MSE per regime is the paper's headline (FAST vs
BT(F) vs BT(P), overall and on special tokens); the density histogram shows dead and dense
features at a glance; score bands are the paper's interpretability result.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .report import _get  # noqa: E402

REGIME_COLORS = {"fast": "tab:green", "bt-f": "tab:orange", "bt-p": "tab:blue", "unknown": "tab:gray"}
ARCH_MARKERS = {"standard": "o", "jumprelu": "s", "topk": "^", "batchtopk": "D"}
REGIME_ORDER = ["fast", "bt-f", "bt-p", "unknown"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and np.isfinite(v)


def group_key(row: dict[str, Any]) -> str:
    """The comparison group: same eval data, model, layer, architecture and width."""
    return f"L{row['layer']} {row['architecture']} {row['d_sae']} | eval {row.get('eval_regime', '?')}"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FRONTIER_X = "reconstruction.subsets_no_prefix.all.l0"  # the headline token filter (report.HEADLINE)
FRONTIER_Y = "reconstruction.subsets_no_prefix.special.log2_mse"


def mse_l0_frontier(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """log2 MSE_st against L0 on the headline tokens, one line per (regime, architecture, eval data)."""
    pts = [r for r in rows if _finite(_get(r, FRONTIER_X)) and _finite(_get(r, FRONTIER_Y))]
    if not pts:
        return None
    layers = sorted({r["layer"] for r in pts})
    fig, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        series: dict[tuple, list] = defaultdict(list)
        for r in pts:
            if r["layer"] == layer:
                series[(r["regime"], r["architecture"], r.get("eval_regime"))].append(r)
        for (regime, arch, ev), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
            rs = sorted(rs, key=lambda r: _get(r, FRONTIER_X))
            x = [max(_get(r, FRONTIER_X), 1e-3) for r in rs]
            y = [_get(r, FRONTIER_Y) for r in rs]
            color = REGIME_COLORS.get(regime, "black")
            ax.plot(x, y, marker=ARCH_MARKERS.get(arch, "x"), color=color,
                    markerfacecolor=color if ev in (regime, None) else "none",  # hollow: scored off-regime
                    label=f"{regime} {arch} (eval {ev})", linestyle="-" if len(rs) > 1 else "none")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short log ranges
        ax.set_xlabel("L0 ★ (active features per token)")
        ax.set_ylabel("log2 MSE_st ★ (eq. 7)")
        ax.set_title(f"MSE–L0 frontier, layer {layer}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def metric_by_regime(rows: list[dict[str, Any]], path: Path,
                     metrics: tuple[tuple[str, str], ...] = (("log2 MSE", "reconstruction.subsets.all.log2_mse"),
                                                             ("log2 MSE_st", "reconstruction.subsets.special.log2_mse"))
                     ) -> Path | None:
    """Grouped bars: one group per (layer, arch, width, eval data), one bar per training regime."""
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        label = r["regime"] if r["regime"] not in groups[group_key(r)] else f"{r['regime']} {r['name']}"
        groups[group_key(r)][label] = r
    bars = sorted({b for g in groups.values() for b in g},
                  key=lambda b: (REGIME_ORDER.index(b.split()[0]) if b.split()[0] in REGIME_ORDER else 9, b))
    metrics = tuple(m for m in metrics if any(_finite(_get(r, m[1])) for r in rows))
    if not metrics or not groups:
        return None
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 1.3 * len(keys) * max(len(bars), 1) / 2 + 3)
                                                       * len(metrics) / 1.5, 4.5), squeeze=False)
    width = 0.8 / max(len(bars), 1)
    for ax, (title, mpath) in zip(axes[0], metrics):
        for i, b in enumerate(bars):
            vals = [_get(groups[k].get(b, {}), mpath) if b in groups[k] else None for k in keys]
            ys = [v if _finite(v) else np.nan for v in vals]
            ax.bar(np.arange(len(keys)) + (i - (len(bars) - 1) / 2) * width, ys, width,
                   color=REGIME_COLORS.get(b.split()[0], None), label=b)
        ax.set_xticks(np.arange(len(keys)))
        ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(title)
        ax.set_title(f"{title} by training regime")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def density_histogram(rows: list[dict[str, Any]], path: Path) -> Path | None:
    hs = [(r["row_id"], _get(r, "reconstruction.density_histogram")) for r in rows]
    hs = [(n, h) for n, h in hs if h]
    if not hs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, h in hs[:12]:
        edges = np.asarray(h["log10_frequency_edges"])
        ax.stairs(np.asarray(h["counts"]), edges, label=f"{name} (never fired: {h['n_never_fired']})")
    ax.set_xlabel("log10 firing frequency on eval tokens")
    ax.set_ylabel("features")
    ax.set_title("Feature density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def score_bands(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rs = [r for r in rows if _get(r, "interpretability.scores.share")]
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rs) + 2), 4.2))
    bottom = np.zeros(len(rs))
    cmap = plt.get_cmap("RdYlGn")
    for s in "12345":
        vals = np.array([_get(r, f"interpretability.scores.share.{s}") or 0.0 for r in rs])
        ax.bar(np.arange(len(rs)), vals, bottom=bottom, color=cmap((int(s) - 1) / 4), label=f"score {s}")
        bottom += vals
    ax.set_xticks(np.arange(len(rs)))
    ax.set_xticklabels([f"{r['row_id']}\n({r['regime']})" for r in rs], fontsize=7, rotation=15)
    ax.set_ylabel("share of scored features")
    ax.set_title("Judge score bands (top range = 4–5)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(rows: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """Every figure that has data; returns name -> file path. Judge score bands only when meaningful."""
    from .report import judge_meaningful

    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "mse_l0_frontier": mse_l0_frontier(rows, folder / "mse_l0_frontier.png"),
        "mse_by_regime": metric_by_regime(rows, folder / "mse_by_regime.png", (
            ("log2 MSE_st ★", FRONTIER_Y), ("log2 MSE_st all tokens", "reconstruction.subsets.special.log2_mse"))),
        "feature_density": density_histogram(rows, folder / "feature_density.png"),
        "score_bands": score_bands(rows, folder / "score_bands.png") if judge_meaningful(rows) else None,
    }
    return {k: str(v) for k, v in made.items() if v is not None}
