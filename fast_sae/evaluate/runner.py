"""``run_evaluation``: every SAE × every eval cache -> reconstruction, downstream, chat-structure probes,
interpretability, intervention -> report.json, report.md, plots.

Why a function apart from the CLI: tests and notebooks call it with a dataclass config; the CLI
only parses flags into that config and prints. All inputs are checked before any long pass runs
(``_plan``), so a bad SAE folder, a mismatched cache or an SAE trained on the eval documents fails
in a second, not after an hour. Loaded SAEs and opened caches are passed on, never reopened.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.redact import redact_argv

from .config import EvalConfig
from .curves import training_summary
from .downstream import evaluate_downstream
from .errors import EvalError
from .plots import write_plots
from .provenance import cache_dataset, check_overlap, eval_documents, training_facts
from .reconstruction import (
    evaluate_reconstruction,
    non_finite_warnings,
)
from .report import main_columns, markdown_table, new_report, write_report
from .sources import EvalSelection, SAEEntry, check_against_cache, choose_eval_sequences, load_entries
from .token_filters import HEADLINE_FILTER, TokenFilters


def _cache_labels(caches: list[ActivationCache]) -> list[str]:
    regimes = [c.meta.regime for c in caches]
    if len(set(regimes)) == len(regimes):
        return regimes
    names = [c.path.name for c in caches]
    return names if len(set(names)) == len(names) else [f"{c.meta.regime}{i}" for i, c in enumerate(caches)]


def _row_id(entry: SAEEntry, label: str, n_caches: int) -> str:
    return entry.name if n_caches == 1 else f"{entry.name}@{label}"


def _intervention_brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The intervention summary without the replies (those stay in its own intervention.json)."""
    rows = [{k: r.get(k) for k in ("feature", "alpha", "mean_score", "delta_vs_unmodified", "n_scored",
                                   "n_identical_to_unmodified")} | {"n_replies": len(r.get("replies", []))}
            for r in summary.get("rows", [])]
    lines = ["| feature | alpha | mean score | Δ vs unmodified | identical to unmodified |", "|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines += [f"| {r['feature']} | {r['alpha']:g} | {f(r['mean_score'])} | {f(r['delta_vs_unmodified'])} | "
              f"{r['n_identical_to_unmodified']}/{r['n_replies']} |" for r in rows]
    judge = summary.get("judge") or {}
    note = f"**Reply scores {judge['note']}**\n\n" if judge and not judge.get("scores_meaningful", True) else ""
    lik = summary.get("likelihood")
    lik_md = ""
    if lik is not None:
        from .intervention_tables import markdown

        lik_md = "**Reference-reply likelihood under steering (no judge).** " + markdown(lik) + "\n\n"
    judged_md = ("**Generated replies, judge scores.** " + note + f"unmodified mean score: "
                 f"{f(summary.get('unmodified_mean_score'))}\n\n" + "\n".join(lines)) if rows else ""
    return {"rows": rows, "unmodified_mean_score": summary.get("unmodified_mean_score"),
            "likelihood": None if lik is None else {k: v for k, v in lik.items() if k != "per_direction"},
            "features": summary.get("features"), "layer": summary.get("layer"), "mode": summary.get("mode"),
            "direction": summary.get("direction"), "positions": summary.get("positions"), "judge": summary.get("judge"),
            "files": summary.get("files"), "seconds": summary.get("seconds"),
            "table_markdown": (lik_md + judged_md).strip()}


@dataclass
class CachePlan:
    """One eval cache and what is read of it, fixed (and checked) before any long pass."""

    cache: ActivationCache
    label: str
    selection: EvalSelection  # the reconstruction/downstream tokens (capped)
    held_out: EvalSelection  # every eval sequence (uncapped): interpretability and feature discovery
    filters: TokenFilters  # which tokens each token filter keeps (the ★ prefix of the selected documents)
    overlap: dict[str, dict[str, Any]]  # SAE name -> check_overlap finding

    def describe(self) -> dict[str, Any]:
        c = self.cache
        return {"label": self.label, "model_id": c.meta.model_id, "regime": c.meta.regime, "n_tokens": c.n_tokens,
                "n_sequences": c.meta.n_sequences, "dataset": c.meta.dataset,
                "dataset_fingerprint": c.meta.dataset_fingerprint, "documents": cache_dataset(c),
                "selection": self.selection.describe(), "held_out_sequences": int(len(self.held_out.sequences)),
                "shared_prefix_length": self.filters.prefix_length}


def _overlap_line(entry: SAEEntry, cache: ActivationCache, finding: dict[str, Any]) -> str:
    return (f"{entry.path}: {finding['note']} of {cache.path} (dataset {finding['eval_dataset']!r}); evaluate on "
            f"held-out documents (harvest --docs holdout) or pass --allow-overlap")


def _plan(cfg: EvalConfig, entries: list[SAEEntry]) -> tuple[list[CachePlan], list[str]]:
    """Open and check every cache, choose its eval sequences, refuse training-data overlap (unless allowed)."""
    caches = [ActivationCache.open(p) for p in cfg.caches]
    warnings: list[str] = []
    for cache in caches:
        for e in entries:
            alias = check_against_cache(e, cache, aliases=cfg.model_aliases)  # --model only changes what is loaded
            if alias is not None and alias not in warnings:
                warnings.append(alias)
    plans = []
    for cache, label in zip(caches, _cache_labels(caches)):
        sel = choose_eval_sequences(entries, cache, explicit=cfg.eval_range, max_tokens=cfg.max_eval_tokens)
        held = choose_eval_sequences(entries, cache, explicit=cfg.eval_range, max_tokens=None)
        docs = eval_documents(cache, held)
        findings = {e.name: check_overlap(e, cache, docs) for e in entries}
        for e in entries:
            finding = findings[e.name]
            if finding["status"] == "overlap":
                if not cfg.allow_overlap:
                    raise EvalError(_overlap_line(e, cache, finding))
                warnings.append("TRAINING-DATA OVERLAP (--allow-overlap): " + _overlap_line(e, cache, finding))
            elif finding["status"] == "unknown":
                warnings.append(f"{e.name}: cannot check that it was not trained on the eval documents of "
                                f"{cache.path}: {finding['note']}")
        plans.append(CachePlan(cache, label, sel, held, TokenFilters.of(cache, sel), findings))
        # the document check settles what the regime heuristic of the sequence choice could only guess
        settled = [f"{e.name}: " for e in entries if findings[e.name]["status"] in ("disjoint", "other dataset")]
        warnings += [w for w in sel.warnings if not w.startswith(tuple(settled))]
    return plans, warnings


def _load_models(cfg: EvalConfig, plans: list[CachePlan], models: dict[str, tuple[Any, Any]] | None,
                 log: Callable[[str], None]) -> dict[str, tuple[Any, Any]]:
    """The models downstream loss / intervention need, loaded now: a bad model id fails before any pass."""
    models = dict(models or {})
    if not (cfg.downstream.enabled or cfg.intervention.enabled):
        return models
    for model_id in dict.fromkeys(cfg.model or p.cache.meta.model_id for p in plans):
        if model_id not in models:
            models[model_id] = _load_model(model_id, cfg.device, log)
    for p in plans:
        model_id = cfg.model or p.cache.meta.model_id
        hidden = int(models[model_id][0].config.get_text_config().hidden_size)
        if hidden != p.cache.d_model:
            raise EvalError(f"model {model_id!r} has d_model {hidden}, cache {p.cache.path} has {p.cache.d_model}")
    return models


def _settings(cfg: EvalConfig, plans: list[CachePlan]) -> dict[str, Any]:
    return {"saes": [str(p) for p in cfg.saes], "caches": [str(p.cache.path) for p in plans],
            "max_eval_tokens": cfg.max_eval_tokens, "eval_range": cfg.eval_range, "allow_overlap": cfg.allow_overlap,
            "reconstruction": asdict(cfg.reconstruction),
            "downstream": asdict(cfg.downstream) if cfg.downstream.enabled else None, "model": cfg.model,
            "interpret": asdict(cfg.interpret) if cfg.interpret.enabled else None,
            "intervention": asdict(cfg.intervention) if cfg.intervention.enabled else None,
            "judge": cfg.active_judge.describe() if cfg.active_judge else None,
            "probes": asdict(cfg.probes) if cfg.probes.enabled else None,
            "saebench": asdict(cfg.saebench) if cfg.saebench.enabled else None,
            "headline_filter": HEADLINE_FILTER}


def _evaluate_cache(cfg: EvalConfig, entries: list[SAEEntry], plan: CachePlan, n_caches: int,
                    models: dict[str, tuple[Any, Any]], report: dict[str, Any],
                    log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Reconstruction (and downstream loss) of every SAE on one eval cache: one row per SAE."""
    cache, sel = plan.cache, plan.selection
    log(f"{cache.path} ({plan.label}): {sel.n_tokens} eval tokens in {len(sel.sequences)} sequences — {sel.note}; "
        f"shared prefix {plan.filters.prefix_length} tokens")
    freq_dir = cfg.out / "feature_frequency"
    freq_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for layer in sorted({e.layer for e in entries}):
        group = [e for e in entries if e.layer == layer]
        results = evaluate_reconstruction({e.name: e.sae for e in group}, cache, layer, sel, cfg.reconstruction)
        for e in group:
            rid = _row_id(e, plan.label, n_caches)
            res = results[e.name]
            report["warnings"] += non_finite_warnings(f"{rid} on {cache.path} layer {layer}", res)
            freq_file = freq_dir / f"{_safe(rid)}.npy"
            np.save(freq_file, res.feature_frequency.astype(np.float32))
            facts = training_facts(e)
            rows[e.name] = {"row_id": rid, **e.describe(), "eval_cache": str(cache.path),
                            "eval_regime": cache.meta.regime, "eval_label": plan.label,
                            "eval_tokens": sel.n_tokens, "eval_sequences": int(len(sel.sequences)),
                            "training_overlap": plan.overlap[e.name], "normalization": facts.normalization,
                            "training_dataset": facts.dataset, "training": training_summary(e.path),
                            "reconstruction": res.to_dict() | {"feature_frequency_file": str(freq_file)},
                            "downstream": None, "interpretability": None, "intervention": None, "probes": None,
                            "saebench": None}
    if cfg.downstream.enabled:
        model_id = cfg.model or cache.meta.model_id
        down = evaluate_downstream(models[model_id][0], {e.name: (e.sae, e.layer) for e in entries}, cache, sel,
                                   cfg.downstream, filters=plan.filters)
        for name, ds in down.items():
            rows[name]["downstream"] = ds.to_dict() | {"model": model_id}
            err = ds.to_dict()["cache_match_rel_err"]
            if err > 0.05:
                report["warnings"].append(
                    f"{cache.path} layer {ds.layer}: the model's block output differs from the cached "
                    f"activations by {err:.2g} (relative); wrong model or layer indexing?")
    return rows


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = print,
                   models: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Evaluate, write the report into ``cfg.out`` and return it (see the module docstring).

    ``models`` may pass already loaded ``model_id -> (model, tokenizer)`` (the rest load on demand).
    """
    t0 = time.time()
    if not cfg.caches:
        raise EvalError("no cache given: pass --cache (the training cache) or --eval-cache")
    sae_paths: list[str | Path] = list(cfg.saes)
    entries = load_entries(sae_paths, device=cfg.device)
    plans, warnings = _plan(cfg, entries)  # every check first: fail before any long pass
    if cfg.saebench.enabled:
        cfg.saebench.venv_python()  # a missing venv fails now, not after the long passes
    models = _load_models(cfg, plans, models, log)
    report = new_report(redact_argv(sys.argv), _settings(cfg, plans))  # no credential in a report
    report["warnings"] += warnings
    report["caches"] = {str(p.cache.path): p.describe() for p in plans}
    rows_by_cache = {str(p.cache.path): _evaluate_cache(cfg, entries, p, len(plans), models, report, log)
                     for p in plans}
    rows = [by_name[e.name] for by_name in rows_by_cache.values() for e in entries]
    if cfg.probes.enabled:
        for p in plans:
            _probe(cfg, entries, p, rows_by_cache[str(p.cache.path)], log)
    if cfg.saebench.enabled:
        _saebench(cfg, entries, plans[0], rows_by_cache[str(plans[0].cache.path)], report, log)
    try:
        if cfg.active_judge is not None and cfg.judge.calibrate:
            report["judge_calibration"] = _calibrate(cfg, plans[0], models, log)
            report["settings"]["judge"] = cfg.judge.describe()
        if cfg.interpret.enabled:
            _interpret(cfg, entries, plans[0], rows_by_cache[str(plans[0].cache.path)], models, log)
        if cfg.intervention.enabled:
            # feature discovery needs special tokens: the first eval cache that has chat-template tokens
            chat = next((p for p in plans if p.cache.meta.regime != "bt-p"), plans[0])
            _intervene(cfg, entries, chat, rows_by_cache[str(chat.cache.path)], models, log)
    except BaseException as exc:  # an interrupt or a failure in the long judged part: keep what is done
        _write_partial(report, rows, cfg, exc, t0)
        raise
    report["rows"] = rows
    if cfg.plots:
        report["plots"] = write_plots(report["rows"], cfg.out / "plots")
    report["seconds"] = round(time.time() - t0, 2)
    write_report(report, cfg.out)
    return report


def _write_partial(report: dict[str, Any], rows: list[dict[str, Any]], cfg: EvalConfig, exc: BaseException,
                   t0: float) -> None:
    """report.json/report.md with every finished part (reconstruction, downstream, the SAEs already
    judged), marked incomplete; judge replies already received are also in the judge caches, so a
    rerun asks only what is missing."""
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'interrupted'}"
    report.update(rows=rows, incomplete=why, seconds=round(time.time() - t0, 2))
    report["warnings"].append(f"incomplete evaluation, stopped by {why}; rows without interpretability or "
                              f"intervention were not finished")
    try:
        write_report(report, cfg.out)
    except Exception:  # never hide the original error behind a second one
        pass


def _calibrate(cfg: EvalConfig, plan: CachePlan, models: dict[str, tuple[Any, Any]],
               log: Callable[[str], None]) -> dict[str, Any]:
    """Score the judge on known cases from the held-out sequences (interpret.calibration); the result
    decides whether this evaluation calls its judge scores meaningful."""
    from .interpret.calibration import calibrate
    from .interpret.judge import ReplyCache
    from .interpret.judge_backends import make_backend

    judge = cfg.judge
    local = models.get(judge.model) if judge.backend == "local" and judge.model else None
    backend = make_backend(judge, **({} if local is None else {"model": local[0], "tokenizer": local[1]}))
    log(f"judge calibration: {2 * judge.calibration_cases} known cases per task ({judge.backend} {judge.model})")
    held = TokenFilters.of(plan.cache, plan.held_out)
    try:
        result = calibrate(backend, plan.cache, cfg.out, judge_info=judge.describe(), retries=judge.retries,
                           reply_cache=ReplyCache(judge.cache_dir or cfg.out / "judge_cache"),
                           cases=judge.calibration_cases, min_auc=judge.calibration_min_auc,
                           top_n=cfg.interpret.top_n, window=cfg.interpret.window, seed=cfg.interpret.seed,
                           token_ranges=plan.held_out.token_runs(), prefix_length=held.prefix_length)
    except ValueError as exc:
        raise EvalError(f"judge calibration: {exc}") from None
    judge.calibration = result
    log(result["line"])
    return {k: v for k, v in result.items() if k != "judge"}


def _interpret(cfg: EvalConfig, entries: list[SAEEntry], plan: CachePlan, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """Top examples, judge and dashboard per SAE, on the held-out sequences of the first eval cache."""
    from .interpret import run_interpretability

    settings, judge = cfg.interpret, cfg.active_judge
    judge_model = models.get(judge.model) if judge is not None and judge.backend == "local" and judge.model else None
    for e in entries:
        row = rows[e.name]
        log(f"interpretability: {row['row_id']}")
        summary = run_interpretability(e.sae, plan.cache, cfg.out / "interpret" / _safe(row["row_id"]),
                                       n_features=settings.n_features, top_n=settings.top_n, window=settings.window,
                                       judge=judge, seed=settings.seed, judge_model=judge_model,
                                       token_ranges=plan.held_out.token_runs(), name=str(e.path))
        row["interpretability"] = {k: v for k, v in summary.items() if k != "features"}


def _probe(cfg: EvalConfig, entries: list[SAEEntry], plan: CachePlan, rows: dict[str, dict[str, Any]],
           log: Callable[[str], None]) -> None:
    """Chat-structure sparse probes of every SAE on the eval tokens of one cache (evaluate.probes)."""
    from .interpret.top_examples import TokenRenderer
    from .probes import probe_layer

    render = TokenRenderer.for_cache(plan.cache)
    for layer in sorted({e.layer for e in entries}):
        group = [e for e in entries if e.layer == layer]
        log(f"chat-structure probes: {len(group)} SAE(s) at layer {layer} on {plan.cache.path}")
        results = probe_layer({e.name: e.sae for e in group}, plan.cache, layer, plan.selection, cfg.probes, render)
        for e in group:
            rows[e.name]["probes"] = results[e.name]


def _saebench(cfg: EvalConfig, entries: list[SAEEntry], plan: CachePlan, rows: dict[str, dict[str, Any]],
              report: dict[str, Any], log: Callable[[str], None]) -> None:
    """SAEBench's own evaluations of every SAE (evaluate.saebench), in its venv; core reads the held-out tokens
    of the first eval cache, so the results go to that cache's rows."""
    from .saebench.run import run_saebench

    model_id = cfg.model or plan.cache.meta.model_id
    done = run_saebench(cfg.saebench, entries, plan.cache, plan.held_out, model_id, cfg.out / "saebench", log)
    report["saebench"] = done["settings"]
    report["warnings"] += done["warnings"]
    for e in entries:
        rows[e.name]["saebench"] = done["per_sae"].get(e.name) or None


def _intervene(cfg: EvalConfig, entries: list[SAEEntry], plan: CachePlan, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """The special-token steering experiment per SAE (features discovered on the held-out eval sequences)."""
    from .intervention import run_intervention

    iv = cfg.intervention
    model_id = cfg.model or plan.cache.meta.model_id
    for e in entries:
        row = rows[e.name]
        log(f"special-token intervention: {row['row_id']}")
        summary = run_intervention(e.sae, plan.cache, cfg.out / "intervention" / _safe(row["row_id"]),
                                   prompts=iv.prompts, alphas=iv.alphas, n_features=iv.n_features,
                                   positions=iv.positions, max_new_tokens=iv.max_new_tokens, judge=cfg.active_judge,
                                   features=iv.features, mode=iv.mode, direction=iv.direction, model_id=model_id,
                                   model=models.get(model_id), token_ranges=plan.held_out.token_runs(),
                                   name=str(e.path), generate=iv.generate,
                                   likelihood=None if not iv.likelihood else {
                                       "n_conversations": iv.conversations, "reply_tokens": iv.reply_tokens,
                                       "n_random": iv.random_directions, "n_matched": iv.matched_features,
                                       "seed": iv.seed},
                                   frequency=_frequency(row))
        row["intervention"] = _intervention_brief(summary)


def _frequency(row: dict[str, Any]) -> np.ndarray | None:
    """The SAE's feature activation frequency on the eval tokens, as the reconstruction pass saved it."""
    path = (row.get("reconstruction") or {}).get("feature_frequency_file")
    return np.load(path) if path and Path(path).is_file() else None


def _load_model(model_id: str, device: str, log: Callable[[str], None]) -> tuple[Any, Any]:
    from fast_sae.lm import ModelLoadError, load_model, load_tokenizer

    log(f"loading {model_id} (downstream loss / intervention)")
    try:
        return load_model(model_id, device=device), load_tokenizer(model_id)
    except ModelLoadError as exc:
        raise EvalError(f"{exc} (needed for the downstream loss: pass --model, or --no-downstream "
                        f"for model-free metrics only)") from None


def _safe(name: str) -> str:
    return name.replace("/", "__").replace("@", "__")


def summary_table(report: dict[str, Any]) -> str:
    return markdown_table(report["rows"], main_columns(report["rows"]))
