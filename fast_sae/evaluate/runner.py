"""``run_evaluation``: every SAE × every eval cache -> reconstruction, downstream, interpretability,
intervention -> report.json, report.md, plots.

Why a function apart from the CLI: tests and notebooks call it with a dataclass config; the CLI
only parses flags into that config and prints. All inputs are checked before any long pass runs,
so a bad SAE folder or a mismatched cache fails in a second, not after an hour.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache

from .downstream import DownstreamConfig, evaluate_downstream
from .errors import EvalError
from .plots import write_plots
from .reconstruction import ReconstructionConfig, evaluate_reconstruction
from .report import MAIN_COLUMNS, markdown_table, new_report, write_report
from .sources import EvalSelection, SAEEntry, check_against_cache, choose_eval_sequences, load_entries


@dataclass
class InterpretSettings:
    """Arguments passed to ``evaluate.interpret.run_interpretability`` per SAE."""

    n_features: int = 32
    top_n: int = 5
    window: int = 8
    seed: int = 0
    judge: Any | None = None  # evaluate.interpret.JudgeConfig, or None for top examples + dashboard only


@dataclass
class InterventionSettings:
    """Arguments passed to ``evaluate.intervention.run_intervention`` per SAE."""

    alphas: tuple[float, ...] = (0, 15, 25, 50)
    n_features: int = 1
    features: list[int] | None = None
    positions: str = "all"
    mode: str = "add"
    max_new_tokens: int = 48
    prompts: list[str] | None = None
    judge: Any | None = None


@dataclass
class EvalConfig:
    saes: list[Path]
    caches: list[Path]  # the caches whose tokens the SAEs are scored on
    out: Path
    max_eval_tokens: int | None = 200_000
    eval_sequences: tuple[int, int] | None = None
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    downstream: DownstreamConfig | None = field(default_factory=DownstreamConfig)  # None: skipped
    model: str | None = None  # model for downstream/intervention (default: each cache's model_id)
    interpret: InterpretSettings | None = None
    intervention: InterventionSettings | None = None
    device: str = "cpu"
    plots: bool = True


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
    f = (lambda v: "–" if v is None else f"{v:.2f}")
    lines += [f"| {r['feature']} | {r['alpha']:g} | {f(r['mean_score'])} | {f(r['delta_vs_unmodified'])} | "
              f"{r['n_identical_to_unmodified']}/{r['n_replies']} |" for r in rows]
    return {"rows": rows, "unmodified_mean_score": summary.get("unmodified_mean_score"),
            "features": summary.get("features"), "layer": summary.get("layer"), "mode": summary.get("mode"),
            "positions": summary.get("positions"), "judge": summary.get("judge"), "files": summary.get("files"),
            "seconds": summary.get("seconds"),
            "table_markdown": f"unmodified mean score: {f(summary.get('unmodified_mean_score'))}\n\n" + "\n".join(lines)}


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = print,
                   models: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Evaluate, write the report into ``cfg.out`` and return it (see the module docstring).

    ``models`` may pass already loaded ``model_id -> (model, tokenizer)`` (the rest load on demand).
    """
    t0 = time.time()
    if not cfg.caches:
        raise EvalError("no cache given: pass --cache (the training cache) or --eval-cache")
    entries = load_entries(cfg.saes, device=cfg.device)
    caches = [ActivationCache.open(p) for p in cfg.caches]
    for cache in caches:  # all checks first: fail before any long pass
        for e in entries:
            check_against_cache(e, cache)  # --model only changes what is loaded
    labels = _cache_labels(caches)
    models = dict(models or {})
    if cfg.downstream is not None or cfg.intervention is not None:  # load now: a bad model id fails before any pass
        for model_id in dict.fromkeys(cfg.model or c.meta.model_id for c in caches):
            if model_id not in models:
                models[model_id] = _load_model(model_id, cfg.device, log)
        for cache in caches:
            model_id = cfg.model or cache.meta.model_id
            hidden = int(models[model_id][0].config.get_text_config().hidden_size)
            if hidden != cache.d_model:
                raise EvalError(f"model {model_id!r} has d_model {hidden}, cache {cache.path} has {cache.d_model}")
    settings = {"saes": [str(p) for p in cfg.saes], "caches": [str(c.path) for c in caches],
                "max_eval_tokens": cfg.max_eval_tokens, "eval_sequences": cfg.eval_sequences,
                "reconstruction": asdict(cfg.reconstruction),
                "downstream": asdict(cfg.downstream) if cfg.downstream else None, "model": cfg.model,
                "interpret": ({k: v for k, v in asdict(cfg.interpret).items() if k != "judge"}
                              | {"judge": cfg.interpret.judge.describe() if cfg.interpret.judge else None})
                if cfg.interpret else None,
                "intervention": ({k: v for k, v in asdict(cfg.intervention).items() if k != "judge"}
                                 | {"judge": cfg.intervention.judge.describe() if cfg.intervention.judge else None})
                if cfg.intervention else None}
    report = new_report(sys.argv, settings)
    rows: list[dict[str, Any]] = []
    rows_by_cache: dict[str, dict[str, dict[str, Any]]] = {}
    freq_dir = cfg.out / "feature_frequency"
    freq_dir.mkdir(parents=True, exist_ok=True)

    for cache, label in zip(caches, labels):
        sel: EvalSelection = choose_eval_sequences(entries, cache, explicit=cfg.eval_sequences,
                                                   max_tokens=cfg.max_eval_tokens)
        report["warnings"] += sel.warnings
        report["caches"][str(cache.path)] = {"label": label, "model_id": cache.meta.model_id,
                                             "regime": cache.meta.regime, "n_tokens": cache.n_tokens,
                                             "n_sequences": cache.meta.n_sequences,
                                             "dataset": cache.meta.dataset,
                                             "dataset_fingerprint": cache.meta.dataset_fingerprint,
                                             "selection": sel.describe()}
        log(f"{cache.path} ({label}): {sel.n_tokens} eval tokens in {len(sel.sequences)} sequences — {sel.note}")
        cache_rows: dict[str, dict[str, Any]] = {}
        for layer in sorted({e.layer for e in entries}):
            group = [e for e in entries if e.layer == layer]
            results = evaluate_reconstruction({e.name: e.sae for e in group}, cache, layer, sel, cfg.reconstruction)
            for e in group:
                rid = _row_id(e, label, len(caches))
                res = results[e.name]
                freq_file = freq_dir / f"{_safe(rid)}.npy"
                np.save(freq_file, res.feature_frequency.astype(np.float32))
                cache_rows[e.name] = {"row_id": rid, **e.describe(), "eval_cache": str(cache.path),
                                      "eval_regime": cache.meta.regime, "eval_label": label,
                                      "eval_tokens": sel.n_tokens, "eval_sequences": int(len(sel.sequences)),
                                      "reconstruction": res.to_dict() | {"feature_frequency_file": str(freq_file)},
                                      "downstream": None, "interpretability": None, "intervention": None}
        if cfg.downstream is not None:
            model_id = cfg.model or cache.meta.model_id
            model = models[model_id][0]
            down = evaluate_downstream(model, {e.name: (e.sae, e.layer) for e in entries}, cache, sel,
                                       DownstreamConfig(**{**asdict(cfg.downstream), "device": cfg.device}))
            for name, res in down.items():
                cache_rows[name]["downstream"] = res.to_dict() | {"model": model_id}
                err = res.to_dict()["cache_match_rel_err"]
                if err > 0.05:
                    report["warnings"].append(
                        f"{cache.path} layer {res.layer}: the model's block output differs from the cached "
                        f"activations by {err:.2g} (relative); wrong model or layer indexing?")
        rows += [cache_rows[e.name] for e in entries]
        rows_by_cache[str(cache.path)] = cache_rows

    if cfg.interpret is not None:
        _interpret(cfg, entries, caches[0], rows_by_cache[str(caches[0].path)], models, log)
    if cfg.intervention is not None:
        # feature discovery needs special tokens: the first eval cache that has chat-template tokens
        chat = next((c for c in caches if c.meta.regime != "bt-p"), caches[0])
        _intervene(cfg, entries, chat, rows_by_cache[str(chat.path)], models, log)

    report["rows"] = rows
    if cfg.plots:
        report["plots"] = write_plots(rows, cfg.out / "plots")
    report["seconds"] = round(time.time() - t0, 2)
    write_report(report, cfg.out)
    return report


def _interpret(cfg: EvalConfig, entries: list[SAEEntry], cache: ActivationCache, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """Top examples, judge and dashboard per SAE, on the first eval cache (judging is the costly part)."""
    from .interpret import run_interpretability

    settings = cfg.interpret
    assert settings is not None
    for e in entries:
        row = rows[e.name]
        log(f"interpretability: {row['row_id']}")
        judge_model = None
        if settings.judge is not None and settings.judge.backend == "local":
            judge_model = models.get(settings.judge.model)
        summary = run_interpretability(e.path, cache.path, cfg.out / "interpret" / _safe(row["row_id"]),
                                       n_features=settings.n_features, top_n=settings.top_n, window=settings.window,
                                       judge=settings.judge, seed=settings.seed, judge_model=judge_model)
        row["interpretability"] = {k: v for k, v in summary.items() if k != "features"}


def _intervene(cfg: EvalConfig, entries: list[SAEEntry], cache: ActivationCache, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """The special-token steering experiment per SAE (its features are discovered on ``cache``)."""
    from .intervention import run_intervention

    iv = cfg.intervention
    assert iv is not None
    model_id = cfg.model or cache.meta.model_id
    for e in entries:
        row = rows[e.name]
        log(f"special-token intervention: {row['row_id']}")
        summary = run_intervention(e.path, cache.path, cfg.out / "intervention" / _safe(row["row_id"]),
                                   prompts=iv.prompts, alphas=iv.alphas, n_features=iv.n_features,
                                   positions=iv.positions, max_new_tokens=iv.max_new_tokens, judge=iv.judge,
                                   features=iv.features, mode=iv.mode, model_id=model_id, model=models.get(model_id))
        row["intervention"] = _intervention_brief(summary)


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
    return markdown_table(report["rows"], MAIN_COLUMNS)
