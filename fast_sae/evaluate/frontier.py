"""MSE–L0 frontiers per training regime, and the regimes compared at matched L0.

Why: SAEs trained with the same sparsity coefficient land at different L0 under different
regimes (and a lower L0 always costs reconstruction), so a comparison at one coefficient mixes
the regime's effect with the sparsity's. Each regime's sweep of SAEs (several L1/L0 coefficients
or k values of one architecture and width) traces a frontier: log2 MSE against L0. The regimes are
compared where their frontiers overlap.

How (``matched``): per token filter and metric, a regime's points (L0, log2 MSE) are sorted by L0
(equal L0s averaged) and joined linearly in (ln L0, log2 MSE), i.e. a power law between
neighbouring SAEs. The common L0 range is the intersection of the regimes' [min L0, max L0]; the
comparison points are ``N_MATCHED`` values spaced evenly in ln L0 across it (one point when the
range is narrower than 5%). Nothing is extrapolated: outside a regime's own range it has no value.
L0 is measured on the same tokens as the MSE (the filter's ``all`` subset).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .curves import load_curve  # noqa: E402
from .plots import REGIME_COLORS, REGIME_ORDER  # noqa: E402
from .report import _get  # noqa: E402

# (filter id, label, report key) — the headline first
FILTERS = [("no_prefix", "★ no prefix", "subsets_no_prefix"), ("no_pos0", "no pos 0", "subsets_no_pos0"),
           ("all_tokens", "all tokens", "subsets")]
METRICS = [("log2 MSE_st", "special"), ("log2 MSE content", "content")]
N_MATCHED = 4


def regime_order(regimes: Sequence[str]) -> list[str]:
    return sorted(regimes, key=lambda r: (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def frontier_points(rows: Sequence[dict[str, Any]], key: str, subset: str) -> list[tuple[float, float]]:
    """(L0, log2 MSE) of each SAE on one filter and subset, sorted by L0, equal L0s averaged."""
    pts: dict[float, list[float]] = {}
    for r in rows:
        l0, y = _get(r, f"reconstruction.{key}.all.l0"), _get(r, f"reconstruction.{key}.{subset}.log2_mse")
        if _finite(l0) and _finite(y) and l0 > 0:
            pts.setdefault(float(l0), []).append(float(y))
    return [(x, float(np.mean(ys))) for x, ys in sorted(pts.items())]


def interpolate(points: Sequence[tuple[float, float]], l0: float) -> float | None:
    """log2 MSE at ``l0`` on the frontier (linear in ln L0), None outside the points' L0 range."""
    if not points:
        return None
    xs = np.log([p[0] for p in points])
    x = math.log(l0)
    if x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, [p[1] for p in points]))


def common_l0(ranges: Sequence[tuple[float, float]], n: int = N_MATCHED) -> list[float]:
    """``n`` L0 values evenly spaced in ln L0 over the intersection of ``ranges`` ([] if they do not meet)."""
    if not ranges:
        return []
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if lo > hi * (1 + 1e-9):
        return []
    if hi < lo * 1.05:
        return [math.sqrt(lo * hi)]
    return [float(v) for v in np.exp(np.linspace(math.log(lo), math.log(hi), n))]


def match_at_l0(points: dict[str, list[tuple[float, float]]], higher_is_better: bool = False,
                margin: float = 0.0) -> dict[str, Any]:
    """Regimes' (L0, value) points (sorted by L0) compared at common L0 values: their ranges, the grid, each
    regime's interpolated values and the best regime per grid value (None on a tie or a lead <= ``margin``)."""
    pts = {r: p for r, p in points.items() if p}
    ranges = {r: (p[0][0], p[-1][0]) for r, p in pts.items()}
    grid = common_l0(list(ranges.values())) if len(pts) > 1 else []
    values = {r: [interpolate(p, x) for x in grid] for r, p in pts.items()}
    best: list[str | None] = []
    for i in range(len(grid)):
        col: dict[str, float] = {r: v for r, vs in values.items() if (v := vs[i]) is not None}
        ranked = sorted(col, key=lambda r: col[r], reverse=higher_is_better)
        lead = abs(col[ranked[0]] - col[ranked[1]]) if len(ranked) > 1 else float("inf")
        best.append(ranked[0] if ranked and lead > margin else None)
    return {"points": {r: [list(p) for p in v] for r, v in pts.items()},
            "ranges": {r: list(v) for r, v in ranges.items()}, "l0": grid, "values": values, "best": best}


def matched(by_regime: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (filter, metric): the regimes' ranges, the common L0 values and each regime's interpolated log2 MSE."""
    regimes = regime_order(list(by_regime))
    out = []
    for filt, label, key in FILTERS:
        for metric, subset in METRICS:
            pts = {r: frontier_points(by_regime[r], key, subset) for r in regimes}
            out.append({"filter": filt, "filter_label": label, "metric": metric, "subset": subset}
                       | match_at_l0(pts))
    return out


def plot_frontiers(title: str, table: list[dict[str, Any]], path: Path) -> Path | None:
    """A 2×2 figure: MSE_st and content MSE against L0, on the headline filter and on all tokens."""
    panels = [m for m in table if m["filter"] in ("no_prefix", "all_tokens")]
    if not any(m["points"] for m in panels):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), squeeze=False)
    for ax, m in zip(axes.T.flat, panels):
        for regime in regime_order(list(m["points"])):
            pts = m["points"][regime]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=REGIME_COLORS.get(regime, "black"),
                    label=regime)
        for x in m["l0"]:
            ax.axvline(x, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (same tokens)")
        ax.set_ylabel(m["metric"])
        ax.set_title(f"{m['metric']} — {m['filter_label']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "\n(dotted: matched L0 values)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(title: str, by_regime: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Training MSE (raw units) and L0 against training tokens, one line per SAE, coloured by regime."""
    curves = []
    for regime in regime_order(list(by_regime)):
        for r in by_regime[regime]:
            metrics = _get(r, "training.metrics_file")
            curve = load_curve(Path(metrics), Path(r["path"]).name) if metrics else None
            if curve is not None:
                curves.append((regime, r, curve))
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    seen: dict[str, int] = {}
    for regime, r, c in curves:
        i = seen.get(regime, 0)
        seen[regime] = i + 1
        label = f"{regime} {Path(r['path']).name}"
        for ax, key in zip(axes[0], ("mse", "l0")):
            ax.plot(c["tokens"], c[key], styles[i % len(styles)], color=REGIME_COLORS.get(regime, "black"),
                    label=label, linewidth=1)
        total = c["tokens"][-1]
        for ax in axes[0]:
            for frac in (0.4, 0.5, 0.9):
                ax.axvline(frac * total, color="gray", linestyle=":", linewidth=0.6)
    for ax, key in zip(axes[0], ("training MSE (raw units, window mean)", "L0")):
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.suptitle(title + "\n(dotted: the plateau windows (40%, 50%] and (90%, 100%])", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
