"""``compare``: FAST, BT(F) and BT(P) side by side, from the report.json of one or more evaluations.

Why groups: a comparison is only meaningful between SAEs of the same model, layer, architecture and
width, scored on the same eval data. Inside a group each regime may bring a sweep of SAEs (several
sparsity settings); the regimes are compared at matched L0 on their MSE–L0 frontiers
(frontier.py), on the headline token filter and on all tokens, never at one coefficient. The
group also says whether the regimes share one normalisation constant and whether any SAE was
trained on the eval documents. Judge scores of a judge that did not pass its calibration
(interpret/calibration.py) are carried with their "not meaningful" mark and never ranked.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import EvalError
from .frontier import FILTERS, matched, plot_curves, plot_frontiers, regime_order
from .intervention_tables import compare_lines as intervention_lines
from .plots import metric_by_regime
from .probe_tables import compare_lines, matched_probes
from .report import _get, _json_safe, fmt, judge_meaningful, read_report
from .saebench.tables import compare_lines as saebench_lines
from .saebench.tables import matched_saebench

# the per-SAE table of a group: (label, dotted path, format)
SAE_COLUMNS: list[tuple[str, str, str]] = [
    ("L0 ★", "reconstruction.subsets_no_prefix.all.l0", ".1f"),
    ("log2 MSE_st ★", "reconstruction.subsets_no_prefix.special.log2_mse", ".3f"),
    ("log2 MSE content ★", "reconstruction.subsets_no_prefix.content.log2_mse", ".3f"),
    ("L0 all tok.", "reconstruction.subsets.all.l0", ".1f"),
    ("log2 MSE_st all tok.", "reconstruction.subsets.special.log2_mse", ".3f"),
    ("log2 MSE content all tok.", "reconstruction.subsets.content.log2_mse", ".3f"),
    ("FVE ★", "reconstruction.subsets_no_prefix.all.explained_variance", ".4f"),
    ("dead %", "reconstruction.dead_fraction", "%"),
    ("ΔCE % ★", "downstream.filters.no_prefix.delta_loss_pct", "+.2f"),
    ("ΔCE % all tok.", "downstream.delta_loss_pct", "+.2f"),
    ("plateaued", "training.plateaued", "s"),
    ("MSE drop 2nd half", "training.mse_drop_second_half", "%"),
]
JUDGE_PATH = "interpretability.scores.top_range_share"


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of every report (an eval folder or a report.json), de-duplicated by (SAE path, eval cache); the
    SAEBench results of a duplicate join the first row (each eval from the first report that has a result for
    it), so SAEBench evaluations run in separate `evaluate` calls compare together."""
    if not paths:
        raise EvalError("compare: give at least one evaluation folder (written by `pipeline.py evaluate --out`)")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}
    for p in paths:
        for r in read_report(Path(p))["rows"]:
            key = (r.get("path"), r.get("eval_cache"))
            if key not in seen:
                seen[key] = r
                rows.append(r)
            elif r.get("saebench"):
                kept = seen[key].get("saebench") or {}
                for ev, res in r["saebench"].items():
                    if ev not in kept or ("error" in kept[ev] and "error" not in res):
                        kept[ev] = res
                seen[key]["saebench"] = kept
    return rows


def _group(row: dict[str, Any]) -> tuple:
    return (row.get("model_name") or "?", row["layer"], row["architecture"], row["d_sae"],
            row.get("eval_regime"), row.get("eval_cache"))


def sparsity_label(row: dict[str, Any]) -> str:
    """The SAE's sparsity setting as its name says it (k32, l1_5, l0_0.01), else its name."""
    m = re.search(r"_(k\d+|l[01]_[0-9.e+-]+)$", Path(str(row.get("path", ""))).name)
    return m.group(1) if m else str(row["name"])


def _notes(by_regime: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Normalisation and held-out facts of a group, as lines; anything that undermines it says so."""
    rows = [r for rs in by_regime.values() for r in rs]
    factors = {(round(float(n["factor"]), 9), n.get("source")) for r in rows if (n := r.get("normalization"))
               and n.get("factor") is not None}
    notes = []
    if len(factors) == 1:
        factor, source = next(iter(factors))
        notes.append(f"Normalisation: one shared constant {factor:.6g} for every SAE (from `{source}`).")
    elif factors:
        per = {reg: sorted({f"{float(n['factor']):.4g}" for r in rs if (n := r.get("normalization"))})
               for reg, rs in by_regime.items()}
        notes.append("**Normalisation differs between SAEs** (" + "; ".join(f"{k}: {', '.join(v)}" for k, v in
                     per.items()) + "): the same coefficient is not the same pressure; compare at matched L0 only.")
    status = {r.get("training_overlap", {}).get("status") for r in rows}
    if "overlap" in status:
        notes.append("**Some SAEs were trained on eval documents (evaluated with --allow-overlap).**")
    elif status <= {"disjoint", "other dataset"}:
        n_docs = max((r.get("training_overlap", {}).get("n_eval_docs") or 0) for r in rows)
        notes.append(f"Held-out check: no SAE was trained on any of the {n_docs} eval documents.")
    else:
        notes.append("Held-out check: not every SAE records its training documents (see the report's warnings).")
    plateau = [r for r in rows if _get(r, "training.plateaued") is False]
    if plateau:
        notes.append(f"**{len(plateau)} of {len(rows)} SAEs had not plateaued** by the stated criterion: "
                     + ", ".join(f"`{r['name']}`" for r in plateau[:6]) + (" ..." if len(plateau) > 6 else ""))
    rose = [r for r in rows if _get(r, "training.mse_rose_second_half")]
    if rose:
        notes.append(f"**{len(rose)} of {len(rows)} SAEs got worse over the second half of training** (training MSE "
                     "rose by 5% or more: unstable, not converged): " + ", ".join(f"`{r['name']}`" for r in rose))
    return notes


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups: ``{key, title, regimes: {regime: [names]}, matched: [...], saes: [...], notes, judge}``."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[_group(r)][r.get("regime") or "unknown"].append(r)
    out = []
    for key in sorted(groups, key=str):
        by_regime = {reg: sorted(groups[key][reg], key=lambda r: _get(r, "reconstruction.subsets.all.l0") or 0)
                     for reg in regime_order(list(groups[key]))}
        model, layer, arch, d_sae, ev, ev_cache = key
        all_rows = [r for rs in by_regime.values() for r in rs]
        judged = [r for r in all_rows if _get(r, "interpretability.scores") is not None]
        saes = [{"regime": reg, "name": r["name"], "path": r.get("path"), "sparsity": sparsity_label(r),
                 "values": {label: _get(r, path) for label, path, _ in SAE_COLUMNS},
                 "judge_top_band": _get(r, JUDGE_PATH)} for reg, rs in by_regime.items() for r in rs]
        out.append({"key": list(key), "title": f"{model} · layer {layer} · {arch} · d_sae {d_sae} · eval on {ev} "
                                               f"(`{ev_cache}`)",
                    "regimes": {reg: [r["name"] for r in rs] for reg, rs in by_regime.items()},
                    "matched": matched(by_regime), "probes": matched_probes(by_regime),
                    "saebench": matched_saebench(by_regime), "saes": saes,
                    "intervention": [{"regime": reg, "name": r["name"],
                                      "likelihood": _get(r, "intervention.likelihood")}
                                     for reg, rs in by_regime.items() for r in rs
                                     if _get(r, "intervention.likelihood")],
                    "notes": _notes(by_regime),
                    "judge": None if not judged else {"meaningful": judge_meaningful(judged),
                                                      "note": next((_get(r, "interpretability.judge.note")
                                                                    for r in judged
                                                                    if _get(r, "interpretability.judge.note")), None)},
                    "_rows": by_regime})
    return out


def _matched_table(g: dict[str, Any]) -> list[str]:
    regimes = list(g["regimes"])
    lines = ["| tokens | metric | L0 | " + " | ".join(regimes) + " |", "|---|---|---|" + "---|" * len(regimes)]
    for m in g["matched"]:
        if not m["l0"]:
            ranges = "; ".join(f"{r} {a:.1f}–{b:.1f}" for r, (a, b) in m["ranges"].items())
            lines.append(f"| {m['filter_label']} | {m['metric']} | no common L0 range ({ranges}) |"
                         + " |" * len(regimes))
            continue
        for i, x in enumerate(m["l0"]):
            cells = []
            for r in regimes:
                v = m["values"].get(r, [None] * len(m["l0"]))[i]
                cell = fmt(v, ".3f")
                cells.append(f"**{cell}**" if m["best"][i] == r else cell)
            lines.append(f"| {m['filter_label']} | {m['metric']} | {x:.1f} | " + " | ".join(cells) + " |")
    return lines


def _sae_table(g: dict[str, Any]) -> list[str]:
    cols = [(label, spec) for label, _, spec in SAE_COLUMNS if any(s["values"][label] is not None for s in g["saes"])]
    judge = g.get("judge")
    jlabel = None
    if judge:
        jlabel = "top band % (4–5)" if judge["meaningful"] else "top band % — NOT MEANINGFUL (judge not calibrated)"
    lines = ["| regime | sparsity | " + " | ".join(c for c, _ in cols) + (f" | {jlabel}" if jlabel else "") + " |",
             "|---|---|" + "---|" * (len(cols) + (1 if jlabel else 0))]
    for s in g["saes"]:
        cells = [fmt(s["values"][c], spec) for c, spec in cols]
        if jlabel:
            cells.append(fmt(s["judge_top_band"], "%"))
        lines.append(f"| {s['regime']} | {s['sparsity']} | " + " | ".join(cells) + " |")
    return lines


def summary_line(m: dict[str, Any]) -> str:
    """How often each regime is lowest across the matched L0 values of one (filter, metric)."""
    if not m["l0"]:
        return f"{m['filter_label']} {m['metric']}: no common L0 range"
    wins = {r: sum(b == r for b in m["best"]) for r in m["values"]}
    return (f"{m['filter_label']} {m['metric']}: lowest at " + ", ".join(f"{r} {n}/{len(m['l0'])}"
                                                                          for r, n in wins.items())
            + f" matched L0 values ({m['l0'][0]:.1f}–{m['l0'][-1]:.1f})")


def render_markdown(groups: list[dict[str, Any]]) -> str:
    parts = ["# FAST vs BT(F) vs BT(P)", "",
             "One section per (model, layer, architecture, width, eval data). Regimes are compared at matched "
             "L0: each regime's sweep of SAEs is a frontier of log2 MSE against L0 (measured on the same tokens), "
             "interpolated linearly in (ln L0, log2 MSE) at L0 values spread evenly in ln L0 over the range all "
             "regimes cover; never extrapolated. ★ = the headline token filter (no position 0, no shared prefix; "
             "docs/metrics.md). **Bold** = lowest in its row.", ""]
    for g in groups:
        parts += [f"## {g['title']}", ""] + [f"- {n}" for n in g["notes"]] + [""]
        judge = g.get("judge")
        if judge and not judge["meaningful"]:
            parts += [f"Judge scores below are {judge['note'] or 'not meaningful'}; they are not a result.", ""]
        parts += ["### At matched L0", ""] + _matched_table(g) + [""]
        parts += [f"- {summary_line(m)}" for m in g["matched"] if m["metric"] == "log2 MSE_st" or
                  m["filter"] == FILTERS[0][0]] + [""]
        parts += compare_lines(g)
        parts += intervention_lines(g.get("intervention") or [])
        parts += saebench_lines(g)
        parts += ["### Every SAE", ""] + _sae_table(g) + [""]
        if g.get("plots"):
            parts += [f"![{k}]({Path(v).name})" for k, v in g["plots"].items()] + [""]
    return "\n".join(parts)


def _slug(key: list[Any]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", f"L{key[1]}_{key[2]}_{key[3]}_{key[4]}").strip("_")


def run_compare(paths: list[Path], out: Path | None = None) -> tuple[list[dict[str, Any]], str, dict[str, str]]:
    """Build the comparison; with ``out``, write compare.json, compare.md, frontier and curve plots there."""
    rows = load_rows(paths)
    groups = comparison(rows)
    files: dict[str, str] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for g in groups:
            slug, g["plots"] = _slug(g["key"]), {}
            made = {f"frontier_{slug}": plot_frontiers(g["title"], g["matched"], out / f"frontier_{slug}.png"),
                    f"curves_{slug}": plot_curves(g["title"], g["_rows"], out / f"curves_{slug}.png")}
            g["plots"] = {k: str(v) for k, v in made.items() if v is not None}
            files.update(g["plots"])
        made_bar = metric_by_regime(rows, out / "compare_mse.png",
                                    (("log2 MSE_st ★", "reconstruction.subsets_no_prefix.special.log2_mse"),
                                     ("log2 MSE_st all tokens", "reconstruction.subsets.special.log2_mse")))
        if made_bar:
            files["compare_mse.png"] = str(made_bar)
    md = render_markdown(groups)
    public = [{k: v for k, v in g.items() if k != "_rows"} for g in groups]
    if out is not None:
        (out / "compare.json").write_text(json.dumps(_json_safe({"inputs": [str(p) for p in paths],
                                                                 "groups": public}), indent=1))
        (out / "compare.md").write_text(md)
        files = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"), **files}
    return public, md, files
