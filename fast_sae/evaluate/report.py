"""report.json and report.md: one record ("row") per SAE × eval cache, and the tables people read.

Why rows are flat dicts with fixed keys: ``compare`` reads report.json files written by earlier
runs, and plots and tables all pick values by the same dotted paths (``_get``), so a metric added
here shows up everywhere without parallel code paths.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fast_sae.redact import redact_tree

REPORT_FORMAT = "fast-sae-eval/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

HEADLINE = "subsets_no_prefix"  # reconstruction.<HEADLINE>.<subset>: the token filter the tables lead with
HEADLINE_WHY = ("Headline (★): every token except position 0 of each sequence and the token prefix that every eval "
                "document starts with, at each document start (reconstruction.subsets_no_prefix). Why: position 0 "
                "is an attention sink whose norm (~25,000 against a median of ~175 on the embedded model) makes "
                "it carry almost all of Σ‖x‖², and the shared prefix (the template's default system prompt) has "
                "the same activation in every FAST sequence, training and held-out alike (in BT blocks it is "
                "template, not data); metrics that include them measure a handful of fixed vectors. "
                "The all-token figures stand beside them. Definitions: docs/metrics.md.")

# (header, dotted path in a row, format) of the main table.
MAIN_COLUMNS: list[tuple[str, str, str]] = [
    ("SAE", "name", "s"),
    ("trained", "regime", "s"),
    ("eval on", "eval_regime", "s"),
    ("arch", "architecture", "s"),
    ("d_sae", "d_sae", "d"),
    ("layer", "layer", "d"),
    ("L0 ★", f"reconstruction.{HEADLINE}.all.l0", ".1f"),
    ("log2 MSE ★", f"reconstruction.{HEADLINE}.all.log2_mse", ".3f"),
    ("log2 MSE_st ★", f"reconstruction.{HEADLINE}.special.log2_mse", ".3f"),
    ("log2 MSE content ★", f"reconstruction.{HEADLINE}.content.log2_mse", ".3f"),
    ("FVE ★", f"reconstruction.{HEADLINE}.all.explained_variance", ".4f"),
    ("L0 all tok.", "reconstruction.subsets.all.l0", ".1f"),
    ("log2 MSE all tok.", "reconstruction.subsets.all.log2_mse", ".3f"),
    ("log2 MSE_st all tok.", "reconstruction.subsets.special.log2_mse", ".3f"),
    ("dead %", "reconstruction.dead_fraction", "%"),
    ("ΔCE % ★", "downstream.filters.no_prefix.delta_loss_pct", "+.2f"),
    ("loss rec. ★", "downstream.filters.no_prefix.loss_recovered", ".3f"),
    ("ΔCE % all tok.", "downstream.delta_loss_pct", "+.2f"),
    ("KL all tok.", "downstream.kl_spliced", ".4f"),
    ("plateaued", "training.plateaued", "s"),
]
JUDGE_COLUMN = ("top band %", "interpretability.scores.top_range_share", "%")

# per token filter: the subsets people compare
FILTERS = [("★ no prefix", "subsets_no_prefix"), ("no pos 0", "subsets_no_pos0"), ("all tokens", "subsets")]
SUBSET_COLUMNS: list[tuple[str, str, str]] = [("SAE", "name", "s"), ("eval on", "eval_regime", "s")] + [
    (f"{label}: {what}", f"reconstruction.{key}.{path}", f) for label, key in FILTERS
    for what, path, f in (("L0", "all.l0", ".1f"), ("log2 MSE_st", "special.log2_mse", ".3f"),
                          ("log2 MSE content", "content.log2_mse", ".3f"),
                          ("‖x‖ outliers", "all.n_norm_outliers", "d"))]

ROLE_COLUMNS: list[tuple[str, str, str]] = [("SAE", "name", "s"), ("eval on", "eval_regime", "s")] + [
    (f"{label} {sub}", f"reconstruction.subsets.{sub}.{key}", fmt)
    for sub in ("special", "content", "user", "assistant")
    for label, key, fmt in (("log2 MSE", "log2_mse", ".3f"), ("FVE", "explained_variance", ".3f"),
                            ("L0", "l0", ".1f"))
] + [("log2 MSE special tokens only", "reconstruction.subsets.special_tokens.log2_mse", ".3f"),
     ("log2 MSE template tokens", "reconstruction.subsets.template.log2_mse", ".3f")]


def judge_meaningful(rows: list[dict[str, Any]]) -> bool:
    """Whether every judged row's scores are meaningful: its judge passed the calibration
    (interpret/calibration.py) of that evaluation; False if any row's judge failed or was not calibrated."""
    flags = [_get(r, "interpretability.scores.meaningful") for r in rows if _get(r, "interpretability.scores")]
    return bool(flags) and all(f is not False for f in flags)


def main_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The main table; judge scores only when they are meaningful (else they stay in their own section)."""
    return MAIN_COLUMNS + ([JUDGE_COLUMN] if judge_meaningful(rows) else [])


def _get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def fmt(value: Any, spec: str) -> str:
    """One table cell: '–' for missing, 'nan'/'inf' for non-finite (never shown as a number), percentages
    for '%'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec == "s":
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "−inf" if value == float("-inf") else ("inf" if value == float("inf") else "nan")
    if spec == "%":
        return f"{100 * value:.1f}"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A GitHub markdown table; columns that are empty in every row are dropped."""
    cols = [c for c in columns if any(_get(r, c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(_get(r, p), f) for _, p, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """JSON without NaN/inf tokens (not valid JSON): non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _json_restore(obj: Any) -> Any:
    if obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    return obj


def new_report(command: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": REPORT_FORMAT, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command, "settings": settings, "caches": {}, "rows": [], "warnings": [], "plots": {}}


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_file, md_file = out / REPORT_JSON, out / REPORT_MD
    shown = redact_tree(report)  # no credential given on the command line reaches a report
    json_file.write_text(json.dumps(_json_safe(shown), indent=1, ensure_ascii=False))
    md_file.write_text(render_markdown(shown))
    return json_file, md_file


def read_report(path: Path) -> dict[str, Any]:
    """A report.json (or the folder holding one)."""
    from .errors import EvalError

    path = Path(path)
    f = path / REPORT_JSON if path.is_dir() else path
    if not f.is_file():
        if path.is_dir() and any((sub / "cfg.json").is_file() for sub in path.iterdir() if sub.is_dir()):
            raise EvalError(f"{path}: a training run folder, not an evaluation; score the runs on one eval cache "
                            f"first: pipeline.py evaluate --sae RUN_A --sae RUN_B ... --eval-cache CACHE --out EVAL")
        raise EvalError(f"{path}: no {REPORT_JSON}; run `pipeline.py evaluate ... --out {path}` first")
    try:
        report = _json_restore(json.loads(f.read_text()))
    except ValueError as exc:
        raise EvalError(f"{f}: corrupt JSON ({exc})") from None
    if report.get("format") != REPORT_FORMAT:
        raise EvalError(f"{f}: not an evaluation report (format {report.get('format')!r}, expected {REPORT_FORMAT!r})")
    return report


def _cache_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for path, info in report["caches"].items():
        sel, docs = info.get("selection", {}), info.get("documents") or {}
        which = "" if docs.get("docs", "all") == "all" else (
            f", documents: {docs['docs']} (held-out share {docs.get('holdout_fraction')}, "
            f"seed {docs.get('holdout_seed')})")
        lines.append(f"- eval cache `{path}`: model {info.get('model_id')}, regime {info.get('regime')}, dataset "
                     f"{info.get('dataset')}{which}; {sel.get('n_tokens')} tokens in {sel.get('n_sequences')} "
                     f"sequences ({sel.get('note')}); shared token prefix {info.get('shared_prefix_length')} tokens")
    return lines


def _provenance_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| SAE | trained | training data | eval documents trained on | normalisation factor | from |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ov, norm, ds = r.get("training_overlap") or {}, r.get("normalization") or {}, r.get("training_dataset") or {}
        trained_on = {"disjoint": f"0 of {ov.get('n_eval_docs')}", "overlap": f"**{ov.get('n_trained_on')} of "
                      f"{ov.get('n_eval_docs')}**", "other dataset": "other dataset"}.get(str(ov.get("status")),
                                                                                         "unknown")
        data = f"{ds.get('name')} ({ds.get('docs', 'all')})" if ds else "unknown"
        factor = norm.get("factor")
        lines.append(f"| {r['name']} | {r.get('regime')} | {data} | {trained_on} | "
                     f"{fmt(factor, '.5g') if factor is not None else '–'} ({norm.get('method', '?')}) | "
                     f"`{norm.get('source') or '?'}` |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    parts = [f"# SAE evaluation ({report['created_utc']})", ""]
    overlap = [w for w in report.get("warnings", []) if w.startswith("TRAINING-DATA OVERLAP")]
    if overlap:
        parts += ["**WARNING: some SAEs were trained on eval documents (--allow-overlap); their figures are not "
                  "held-out figures:**", ""] + [f"- {w}" for w in overlap] + [""]
    parts += _cache_lines(report)
    parts += ["", "## Reconstruction, sparsity, downstream loss", "", HEADLINE_WHY, "",
              "MSE is the paper's eq. 7 (per-sequence mean of the per-token squared error, averaged over "
              "sequences, / d_model) in log2; MSE_st on special-token positions (BOS, template special "
              "tokens, role names, separators). FVE = 1 − Σ‖x−x̂‖²/Σ‖x−mean‖² over the eval set. "
              "ΔCE % = (spliced − clean)/clean · 100; ★ downstream: the SAE replaces only the kept positions. "
              "plateaued: the training curve's plateau criterion (docs/metrics.md).", "",
              markdown_table(rows, main_columns(rows)), "",
              "## By token filter", "", "‖x‖ outliers: tokens with ‖x‖ > 10× the median norm of all eval tokens.",
              "", markdown_table(rows, SUBSET_COLUMNS), "",
              "## By token role (all tokens)", "", markdown_table(rows, ROLE_COLUMNS), "",
              "## Training data and normalisation", "", *_provenance_table(rows), ""]
    down = [r for r in rows if r.get("downstream")]
    if down:
        parts += ["## Downstream loss detail", "", markdown_table(down, [
            ("SAE", "name", "s"), ("eval on", "eval_regime", "s"), ("clean CE", "downstream.clean_loss", ".4f"),
            ("spliced CE", "downstream.spliced_loss", ".4f"), ("zero-abl. CE", "downstream.zero_loss", ".4f"),
            ("KL zero", "downstream.kl_zero", ".3f"), ("tokens", "downstream.n_tokens", "d"),
            ("loss rec. no pos 0", "downstream.filters.no_pos0.loss_recovered", ".3f"),
            ("loss rec. ★", "downstream.filters.no_prefix.loss_recovered", ".3f"),
            ("cache match err", "downstream.cache_match_rel_err", ".1e")]), ""]
    from .probe_tables import report_lines  # imported here: probe_tables builds on this module's helpers

    parts += report_lines(rows)
    parts += _calibration_section(report.get("judge_calibration"))
    from .saebench.tables import report_lines as saebench_lines

    parts += saebench_lines(rows, report.get("saebench"))
    parts += _interpretability_section(rows)
    iv = [r for r in rows if r.get("intervention")]
    if iv:
        parts += ["## Special-token intervention", ""]
        for r in iv:
            table = _get(r, "intervention.table_markdown")
            parts += [f"### {r['name']}", "", table if isinstance(table, str) else
                      "```json\n" + json.dumps(_json_safe(r["intervention"]), indent=1)[:4000] + "\n```", ""]
    if report.get("plots"):
        parts += ["## Plots", ""] + [f"![{k}](plots/{Path(v).name})" for k, v in report["plots"].items()] + [""]
    if report.get("warnings"):
        parts += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(parts)


def _calibration_section(cal: dict[str, Any] | None) -> list[str]:
    """The judge's scores on known cases, which decide whether its scores below count (interpret/calibration.py)."""
    if not cal:
        return []
    lines = ["## Judge calibration", "",
             f"**{cal.get('line')}.** Known cases from the held-out eval tokens (content tokens outside the shared "
             f"prefix): *consistency* = prompt judge_v1 on features planted on one word token (every occurrence "
             f"active) vs random latents (one random token per context); *explanation* = prompt explanation_v1, the "
             f"planted class's own explanation vs another class's. AUC = P(positive scores above negative), ties "
             f"½. Judge scores in this report are called meaningful only if both tasks pass.", "",
             "| task | AUC | positives scored | negatives scored | mean score + | mean score − | pass |",
             "|---|---|---|---|---|---|---|"]
    for task, t in (cal.get("tasks") or {}).items():
        lines.append(f"| {task} | {fmt(t.get('auc'), '.3f')} | {t.get('n_positive')}/{t.get('asked_positive')} | "
                     f"{t.get('n_negative')}/{t.get('asked_negative')} | {fmt(t.get('mean_positive'), '.2f')} | "
                     f"{fmt(t.get('mean_negative'), '.2f')} | {fmt(t.get('passed'), 's')} |")
    if cal.get("file"):
        lines += ["", f"Every case, its contexts and the judge's replies: `{cal['file']}`"]
    return lines + [""]


def _interpretability_section(rows: list[dict[str, Any]]) -> list[str]:
    interp = [r for r in rows if r.get("interpretability")]
    if not interp:
        return []
    judged = any(_get(r, "interpretability.scores") for r in interp)
    title = "## Interpretability (held-out eval sequences only)"
    parts = [title, ""]
    if judged and not judge_meaningful(interp):
        note = next((_get(r, "interpretability.judge.note") for r in interp if _get(r, "interpretability.judge.note")),
                    "not meaningful")
        parts += [f"**Judge scores {note}. They are listed for completeness, not as a result.**", ""]
    cols = [("SAE", "name", "s"), ("eval on", "eval_regime", "s"), ("live features", "interpretability.n_live", "d"),
            ("tokens read", "interpretability.n_tokens", "d")]
    if judged:
        cols += [("sampled", "interpretability.n_features_sampled", "d"),
                 *[(f"score {s}", f"interpretability.scores.share.{s}", "%") for s in "12345"],
                 ("top band 4–5", "interpretability.scores.top_range_share", "%"),
                 ("mean", "interpretability.scores.mean_score", ".2f"),
                 ("scored", "interpretability.scores.n_scored", "d")]
    parts += [markdown_table(interp, cols), ""]
    dashboards = [(r["name"], _get(r, "interpretability.files.dashboard")) for r in interp]
    return parts + [f"- {n}: dashboard `{d}`" for n, d in dashboards if d] + [""]
