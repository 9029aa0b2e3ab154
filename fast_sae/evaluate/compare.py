"""``compare``: FAST, BT(F) and BT(P) side by side, from the report.json of one or more evaluations.

Why groups: a comparison is only meaningful between SAEs of the same model, layer, architecture and
width, scored on the same eval data; inside a group one column per training regime (FAST first).
Rows are read from reports, so SAEs evaluated at different times (or machines) can be compared as
long as they were scored on the same eval cache.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import EvalError
from .plots import REGIME_ORDER, metric_by_regime
from .report import _get, _json_safe, fmt, read_report

# (label, dotted path, format, lower_is_better)
COMPARE_METRICS: list[tuple[str, str, str, bool | None]] = [
    ("log2 MSE", "reconstruction.subsets.all.log2_mse", ".3f", True),
    ("log2 MSE_st", "reconstruction.subsets.special.log2_mse", ".3f", True),
    ("log2 MSE content", "reconstruction.subsets.content.log2_mse", ".3f", True),
    ("FVE", "reconstruction.subsets.all.explained_variance", ".4f", False),
    ("FVE special", "reconstruction.subsets.special.explained_variance", ".4f", False),
    ("L0", "reconstruction.subsets.all.l0", ".1f", None),
    ("dead %", "reconstruction.dead_fraction", "%", True),
    ("ΔCE %", "downstream.delta_loss_pct", "+.2f", None),
    ("loss recovered", "downstream.loss_recovered", ".3f", False),
    ("KL", "downstream.kl_spliced", ".4f", True),
    ("top band % (4–5)", "interpretability.scores.top_range_share", "%", False),
]


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of every report (an eval folder or a report.json), de-duplicated by (SAE path, eval cache)."""
    if not paths:
        raise EvalError("compare: give at least one evaluation folder (written by `pipeline.py evaluate --out`)")
    rows, seen = [], set()
    for p in paths:
        for r in read_report(Path(p))["rows"]:
            key = (r.get("path"), r.get("eval_cache"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def _group(row: dict[str, Any]) -> tuple:
    return (row.get("model_name") or "?", row["layer"], row["architecture"], row["d_sae"],
            row.get("eval_regime"), row.get("eval_cache"))


def _column(row: dict[str, Any], taken: set[str]) -> str:
    col = row.get("regime", "unknown")
    return col if col not in taken else f"{col} ({row['name']})"


def _order(col: str) -> tuple:
    base = col.split(" ")[0]
    return (REGIME_ORDER.index(base) if base in REGIME_ORDER else len(REGIME_ORDER), col)


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups: ``{key, title, columns: {column: row}, metrics: [{label, values: {column: v}, best}]}``."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cols = groups[_group(r)]
        cols[_column(r, set(cols))] = r
    out = []
    for key in sorted(groups, key=str):
        cols = dict(sorted(groups[key].items(), key=lambda kv: _order(kv[0])))
        model, layer, arch, d_sae, ev, ev_cache = key
        metrics = []
        for label, path, spec, lower in COMPARE_METRICS:
            values = {c: _get(r, path) for c, r in cols.items()}
            finite = {c: v for c, v in values.items() if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")}
            if not finite:
                continue
            best = None
            if lower is not None and len(finite) > 1:
                target = (min if lower else max)(finite.values())
                winners = [c for c, v in finite.items() if v == target]
                best = winners[0] if len(winners) == 1 else None  # no bold on a tie
            metrics.append({"label": label, "path": path, "format": spec, "values": values, "best": best})
        out.append({"key": list(key), "columns": {c: r["name"] for c, r in cols.items()}, "metrics": metrics,
                    "title": f"{model} · layer {layer} · {arch} · d_sae {d_sae} · eval on {ev} (`{ev_cache}`)"})
    return out


def render_markdown(groups: list[dict[str, Any]]) -> str:
    parts = ["# FAST vs BT(F) vs BT(P)", "",
             "One table per (model, layer, architecture, width, eval data); **bold** = best where "
             "lower/higher is clearly better.", ""]
    for g in groups:
        cols = list(g["columns"])
        parts += [f"## {g['title']}", "", "| metric | " + " | ".join(cols) + " |",
                  "|---|" + "|".join("---" for _ in cols) + "|"]
        for m in g["metrics"]:
            cells = []
            for c in cols:
                cell = fmt(m["values"].get(c), m["format"])
                cells.append(f"**{cell}**" if c == m["best"] else cell)
            parts.append(f"| {m['label']} | " + " | ".join(cells) + " |")
        parts += ["", "SAEs: " + ", ".join(f"{c} = `{n}`" for c, n in g["columns"].items()), ""]
    return "\n".join(parts)


def run_compare(paths: list[Path], out: Path | None = None) -> tuple[list[dict[str, Any]], str, dict[str, str]]:
    """Build the comparison; with ``out``, write compare.json, compare.md and compare_*.png there."""
    rows = load_rows(paths)
    groups = comparison(rows)
    md = render_markdown(groups)
    files: dict[str, str] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(_json_safe({"inputs": [str(p) for p in paths],
                                                                 "groups": groups}), indent=1))
        (out / "compare.md").write_text(md)
        files = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md")}
        for name, metrics in (("compare_mse.png", (("log2 MSE", "reconstruction.subsets.all.log2_mse"),
                                                   ("log2 MSE_st", "reconstruction.subsets.special.log2_mse"))),
                              ("compare_downstream.png", (("ΔCE %", "downstream.delta_loss_pct"),
                                                          ("top band share", "interpretability.scores.top_range_share")))):
            made = metric_by_regime(rows, out / name, metrics)
            if made:
                files[name] = str(made)
    return groups, md, files
