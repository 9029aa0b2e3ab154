"""SAEBench results in tables: report.md's section and compare's FAST vs BT(F) vs BT(P) at matched L0.

Why apart from the runner: report and compare read report.json rows written earlier, so these need
only the rows' ``saebench`` records (saebench.results) and the report's ``saebench`` settings.
Regimes are matched at equal L0 as for the MSE (frontier.match_at_l0): each regime's SAEs joined
linearly in (ln L0, metric), never extrapolated; L0 is the row's ★ reconstruction L0 on the eval
cache (SAEBench's own L0 differs: other tokens), named in the table.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..frontier import match_at_l0, regime_order
from ..report import _get, fmt, markdown_table

L0_PATH = "reconstruction.subsets_no_prefix.all.l0"
# (label, dotted path in a row, higher is better) of the matched-L0 comparison
MATCHED = [("absorption (mean fraction)", "saebench.absorption.mean_absorption_fraction", False),
           ("absorption (full)", "saebench.absorption.mean_full_absorption", False),
           ("core CE loss score", "saebench.core.ce_loss_score", True),
           ("core explained variance", "saebench.core.explained_variance", True),
           ("sae-probes k=1 accuracy", "saebench.sparse_probing_sae_probes.k.1", True),
           ("sae-probes k=5 accuracy", "saebench.sparse_probing_sae_probes.k.5", True)]

CAVEAT = ("SAEBench 0.6.0 itself (the real library, in .venv-saebench), on a 135M model and with the reductions that "
          "make it run on 2 CPU cores (listed below); its thresholds were set for models of 2B parameters and more, "
          "so figures are comparable between the SAEs of this report, not with published SAEBench numbers "
          "(docs/metrics.md, \"SAEBench\").")


def settings_lines(settings: dict[str, Any] | None) -> list[str]:
    if not settings:
        return []
    lines = [f"- model: `{settings.get('model')}` (TransformerLens from `{settings.get('model_folder')}`), layers "
             f"{settings.get('layers')}, forwards stopped after the SAE's layer; {settings.get('seconds')} s"]
    a = settings.get("absorption")
    if a:
        lines.append(f"- absorption: {a['vocab_size'] or 'all'} words of SAEBench's alphabetic vocabulary (seeded "
                     f"{a['seed']}, stratified by first letter, ≥ 5 per letter), 80/20 probe split; k-sparse probes "
                     f"k ≤ {a.get('max_k')}, {a.get('k_sparse_probe_epochs')} epochs; scored when ≥ {a['min_letters']} "
                     f"letters' residual probes reach F1 > 0.6")
    c = settings.get("core")
    if c:
        d = c.get("data") or {}
        lines.append(f"- core: {d.get('rows')} rows × {c['context_size']} tokens = {d.get('tokens')} tokens of the "
                     f"eval cache's held-out sequences (joined in stream order; pad/eos/bos ids left out of SAEBench's "
                     f"metrics), {c['n_batches']} batches")
    p = settings.get("sparse_probing_sae_probes")
    if p:
        lines.append(f"- sparse_probing_sae_probes: {len(p['datasets'])} datasets of the sae-probes wheel "
                     f"({', '.join(p['datasets'])}), k = {', '.join(map(str, p['ks']))}; last-token activations")
    return lines


def report_lines(rows: Sequence[dict[str, Any]], settings: dict[str, Any] | None) -> list[str]:
    done = [r for r in rows if r.get("saebench")]
    if not done:
        return []
    parts = ["## SAEBench", "", CAVEAT, "", *settings_lines(settings), ""]
    base = [("SAE", "name", "s"), ("eval on", "eval_regime", "s"), ("L0 ★", L0_PATH, ".1f")]
    if any(_get(r, "saebench.absorption") for r in done):
        parts += ["### absorption (first letter)", "", "Lower is better. letters: those whose residual probe passed "
                  "(F1 > 0.6); absorption figures are means over them (sd: across letters); words: the test words "
                  "the probe got right, which the per-letter rates rest on.", "",
                  markdown_table(done, base + [
                      ("letters", "saebench.absorption.n_letters", "d"),
                      ("words", "saebench.absorption.probe_true_positives", "d"),
                      ("mean absorption", "saebench.absorption.mean_absorption_fraction", ".4f"),
                      ("sd", "saebench.absorption.sd_absorption_fraction", ".4f"),
                      ("full absorption", "saebench.absorption.mean_full_absorption", ".4f"),
                      ("split features", "saebench.absorption.mean_num_split_features", ".2f"),
                      ("not scored because", "saebench.absorption.error", "s")]), ""]
    if any(_get(r, "saebench.core") for r in done):
        parts += ["### core", "", markdown_table(done, base + [
            ("L0 (core)", "saebench.core.l0", ".1f"), ("FVE", "saebench.core.explained_variance", ".4f"),
            ("cos sim", "saebench.core.cossim", ".4f"), ("CE loss score", "saebench.core.ce_loss_score", ".4f"),
            ("CE with SAE", "saebench.core.ce_loss_with_sae", ".4f"),
            ("CE clean", "saebench.core.ce_loss_without_sae", ".4f"),
            ("KL score", "saebench.core.kl_div_score", ".4f"), ("alive", "saebench.core.frac_alive", "%"),
            ("tokens", "saebench.core.tokens_reconstruction", "d"), ("error", "saebench.core.error", "s")]), ""]
    if any(_get(r, "saebench.sparse_probing_sae_probes") for r in done):
        ks = next((list(k) for r in done if (k := _get(r, "saebench.sparse_probing_sae_probes.k"))), [])
        parts += ["### sparse_probing_sae_probes", "", "Test accuracy, mean over the datasets; dense: the same "
                  "probe on the whole residual (sae-probes' baseline).", "",
                  markdown_table(done, base + [(f"k={k}", f"saebench.sparse_probing_sae_probes.k.{k}", ".3f")
                                               for k in ks] + [
                      ("dense", "saebench.sparse_probing_sae_probes.llm_test_accuracy", ".3f"),
                      ("datasets", "saebench.sparse_probing_sae_probes.n_datasets", "d"),
                      ("error", "saebench.sparse_probing_sae_probes.error", "s")]), ""]
    return parts


# the across-letter sd of each absorption figure: its standard error is sd / sqrt(letters)
_SD = {"saebench.absorption.mean_absorption_fraction": "saebench.absorption.sd_absorption_fraction",
       "saebench.absorption.mean_full_absorption": "saebench.absorption.sd_full_absorption"}


def _se(rows: list[dict[str, Any]], path: str) -> float | None:
    """The largest standard error of the metric over the rows, where SAEBench's output gives one (absorption:
    the sd over letters / sqrt(letters)); None elsewhere (core, sae-probes report no spread)."""
    sd_path = _SD.get(path)
    vals = [sd / n ** 0.5 for r in rows if sd_path and isinstance(sd := _get(r, sd_path), (int, float))
            and isinstance(n := _get(r, "saebench.absorption.n_letters"), int) and n > 1]
    return max(vals) if vals else None


def matched_saebench(by_regime: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per SAEBench metric: the regimes' values at common L0 values (★ reconstruction L0 of each row), and the
    regime ahead by more than the metric's standard error where one is known (else no verdict: ``best`` None)."""
    out = []
    for label, path, higher in MATCHED:
        points: dict[str, list[tuple[float, float]]] = {}
        for regime in regime_order(list(by_regime)):
            pts: dict[float, list[float]] = {}
            for r in by_regime[regime]:
                l0, v = _get(r, L0_PATH), _get(r, path)
                if isinstance(l0, (int, float)) and l0 > 0 and isinstance(v, (int, float)) and not isinstance(v, bool):
                    pts.setdefault(float(l0), []).append(float(v))
            points[regime] = [(x, sum(v) / len(v)) for x, v in sorted(pts.items())]
        if any(points.values()):
            se = _se([r for rs in by_regime.values() for r in rs], path)
            m = match_at_l0(points, higher, margin=se or 0.0)
            if se is None:
                m["best"] = [None] * len(m["l0"])
            out.append({"metric": label, "path": path, "higher_is_better": higher, "se": se} | m)
    return out


def compare_lines(group: dict[str, Any]) -> list[str]:
    table = group.get("saebench") or []
    if not table:
        return []
    regimes = list(group["regimes"])
    lines = ["### SAEBench at matched L0", "", "SAEBench's metrics (the real library; settings in each report.md) "
             "interpolated at common L0 values (★ reconstruction L0 on the eval cache; listed left to right; – outside "
             "a regime's own range); ahead: the better regime at each L0 by more than SE, the metric's standard "
             "error (absorption: sd over letters / √letters); no SE known (core, sae-probes: SAEBench reports no "
             "spread): no verdict. " + CAVEAT, "",
             "| metric | L0 | " + " | ".join(regimes) + " | ahead by > SE | SE |",
             "|---|---|" + "---|" * len(regimes) + "---|---|"]
    for m in table:
        if not m["l0"]:
            ranges = "; ".join(f"{r} {a:.1f}–{b:.1f}" for r, (a, b) in m["ranges"].items()) or "no points"
            lines.append(f"| {m['metric']} | no common L0 range ({ranges}) |" + " |" * len(regimes) + " | |")
            continue
        cells = [" · ".join(fmt(v, ".4f") for v in m["values"].get(r, [None] * len(m["l0"]))) for r in regimes]
        se = m.get("se")
        best = "no SE: no verdict" if se is None else " · ".join(b or "none" for b in m["best"])
        lines.append(f"| {m['metric']} | " + " · ".join(f"{x:.1f}" for x in m["l0"]) + " | " + " | ".join(cells)
                     + f" | {best} | {fmt(se, '.3f')} |")
    return lines + [""]
