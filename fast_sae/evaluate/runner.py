"""``run_evaluation``: every SAE × every eval cache -> reconstruction, downstream, interpretability,
intervention -> report.json, report.md, plots.

Why a function apart from the CLI: tests and notebooks call it with a dataclass config; the CLI
only parses flags into that config and prints. All inputs are checked before any long pass runs,
so a bad SAE folder or a mismatched cache fails in a second, not after an hour.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.options import setting

from .downstream import DownstreamConfig, evaluate_downstream
from .errors import EvalError
from .interpret.config import JudgeConfig
from .plots import write_plots
from .reconstruction import ReconstructionConfig, evaluate_reconstruction, non_finite_warnings
from .report import MAIN_COLUMNS, markdown_table, new_report, write_report
from .sources import EvalSelection, SAEEntry, check_against_cache, choose_eval_sequences, load_entries, parse_range


def read_prompts(text: str) -> list[str]:
    """Intervention prompts from a file: a JSON list of strings, {"prompts": [...]}, or one per line."""
    path = Path(text)
    try:
        body = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"{path}: cannot read prompts ({exc.strerror or exc})") from None
    try:
        doc = json.loads(body)
    except ValueError:
        return [line.strip() for line in body.splitlines() if line.strip()]
    prompts = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise EvalError(f"{path}: expected a JSON list of strings (or {{\"prompts\": [...]}})")
    return prompts


@dataclass
class InterpretSettings:
    """Top-activating examples, judge scores and a dashboard per SAE (evaluate.interpret)."""

    enabled: bool = setting(False, flag="interpret", help="Top-activating examples, LLM judge and dashboard per "
                                                          "SAE.")
    n_features: int = setting(32, help="Features sampled for the judge.")
    top_n: int = setting(5, help="Top contexts per feature.")
    window: int = setting(8, help="Context tokens either side of the max.")
    seed: int = setting(0, flag="feature-seed", help="Seed of the feature sample.")


@dataclass
class InterventionSettings:
    """The special-token steering experiment per SAE (evaluate.intervention)."""

    enabled: bool = setting(False, flag="intervention", help="Steer generation with the SAE's special-token "
                                                             "features and judge the replies.")
    alphas: tuple[float, ...] = setting((0, 15, 25, 50), flag="alphas", help="Steering strengths.")
    n_features: int = setting(1, help="Features to steer with (discovered on special tokens).")
    features: list[int] | None = setting(None, help="Feature ids [default: discovered].")
    positions: str = setting("all", choices=("all", "special"), help="Where to steer.")
    mode: str = setting("add", choices=("add", "scale"), help="Add alpha x decoder direction, or scale the feature.")
    max_new_tokens: int = setting(48, help="Reply length.")
    prompts: list[str] | None = setting(None, flag="prompts-file", parse=read_prompts, metavar="FILE",
                                        help="Intervention prompts: a JSON list or one per line "
                                             "[default: the shipped prompts].")


@dataclass
class EvalConfig:
    """One evaluation: which SAEs, on which cache tokens, which parts; every field with help is also a
    `pipeline.py evaluate` option (nested configs flattened: --downstream-*, --steer-*, --judge-*)."""

    out: Path = setting(short="-o", help="Folder for report.json, report.md, plots/ and per-SAE outputs.")
    saes: list[Path] = setting(default_factory=list, cli=False, help="--sae values (checkpoint or run folders).")
    caches: list[Path] = setting(default_factory=list, cli=False, help="The caches whose tokens are scored.")
    max_eval_tokens: int | None = setting(200_000, help="Token budget of the reconstruction metrics (whole "
                                                        "sequences, in stream order; 0: no cap).")
    eval_range: tuple[int, int] | None = setting(None, parse=parse_range, metavar="START:STOP",
                                                 help="Use exactly these sequences of the eval cache (overrides "
                                                      "the held-out rule).")
    model: str | None = setting(None, help="Model for downstream/intervention [default: the cache's model_id].")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:1 ...")
    plots: bool = setting(True, help="Write PNG plots.")
    progress: bool = setting(True, help="Show progress bars.")
    reconstruction: ReconstructionConfig = setting(default_factory=ReconstructionConfig, prefix="",
                                                   help="Reconstruction metrics.")
    downstream: DownstreamConfig = setting(default_factory=DownstreamConfig, prefix="downstream-",
                                           help="Downstream loss.")
    interpret: InterpretSettings = setting(default_factory=InterpretSettings, prefix="", help="Interpretability.")
    intervention: InterventionSettings = setting(default_factory=InterventionSettings, prefix="steer-",
                                                 help="Special-token intervention.")
    judge: JudgeConfig = setting(default_factory=JudgeConfig, prefix="judge-", help="The LLM judge.")

    def __post_init__(self) -> None:
        """One --device and --progress for every part; 0 tokens means no cap."""
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        for part in (self.reconstruction, self.downstream, self.judge):
            part.device = self.device
        self.reconstruction.progress = self.downstream.progress = self.progress
        if not self.max_eval_tokens:
            self.max_eval_tokens = None
        if self.max_eval_tokens is not None and self.max_eval_tokens < 0:
            raise EvalError("--max-eval-tokens must be >= 0 (0: no cap)")
        for name, value in (("batch-tokens", self.reconstruction.batch_tokens),
                            ("downstream-sequences", self.downstream.max_sequences),
                            ("downstream-tokens", self.downstream.max_tokens),
                            ("n-features", self.interpret.n_features), ("top-n", self.interpret.top_n)):
            if value < 1:
                raise EvalError(f"--{name} must be at least 1")

    @property
    def active_judge(self) -> JudgeConfig | None:
        """The judge when it is to be asked (interpretability or intervention on, judge enabled)."""
        used = self.interpret.enabled or self.intervention.enabled
        return self.judge if self.judge.enabled and used else None


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
    if cfg.downstream.enabled or cfg.intervention.enabled:  # load now: a bad model id fails before any pass
        for model_id in dict.fromkeys(cfg.model or c.meta.model_id for c in caches):
            if model_id not in models:
                models[model_id] = _load_model(model_id, cfg.device, log)
        for cache in caches:
            model_id = cfg.model or cache.meta.model_id
            hidden = int(models[model_id][0].config.get_text_config().hidden_size)
            if hidden != cache.d_model:
                raise EvalError(f"model {model_id!r} has d_model {hidden}, cache {cache.path} has {cache.d_model}")
    settings = {"saes": [str(p) for p in cfg.saes], "caches": [str(c.path) for c in caches],
                "max_eval_tokens": cfg.max_eval_tokens, "eval_range": cfg.eval_range,
                "reconstruction": asdict(cfg.reconstruction),
                "downstream": asdict(cfg.downstream) if cfg.downstream.enabled else None, "model": cfg.model,
                "interpret": asdict(cfg.interpret) if cfg.interpret.enabled else None,
                "intervention": asdict(cfg.intervention) if cfg.intervention.enabled else None,
                "judge": cfg.active_judge.describe() if cfg.active_judge else None}
    report = new_report(sys.argv, settings)
    rows: list[dict[str, Any]] = []
    rows_by_cache: dict[str, dict[str, dict[str, Any]]] = {}
    freq_dir = cfg.out / "feature_frequency"
    freq_dir.mkdir(parents=True, exist_ok=True)

    for cache, label in zip(caches, labels):
        sel: EvalSelection = choose_eval_sequences(entries, cache, explicit=cfg.eval_range,
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
                report["warnings"] += non_finite_warnings(f"{rid} on {cache.path} layer {layer}", res)
                freq_file = freq_dir / f"{_safe(rid)}.npy"
                np.save(freq_file, res.feature_frequency.astype(np.float32))
                cache_rows[e.name] = {"row_id": rid, **e.describe(), "eval_cache": str(cache.path),
                                      "eval_regime": cache.meta.regime, "eval_label": label,
                                      "eval_tokens": sel.n_tokens, "eval_sequences": int(len(sel.sequences)),
                                      "reconstruction": res.to_dict() | {"feature_frequency_file": str(freq_file)},
                                      "downstream": None, "interpretability": None, "intervention": None}
        if cfg.downstream.enabled:
            model_id = cfg.model or cache.meta.model_id
            model = models[model_id][0]
            down = evaluate_downstream(model, {e.name: (e.sae, e.layer) for e in entries}, cache, sel,
                                       cfg.downstream)
            for name, res in down.items():
                cache_rows[name]["downstream"] = res.to_dict() | {"model": model_id}
                err = res.to_dict()["cache_match_rel_err"]
                if err > 0.05:
                    report["warnings"].append(
                        f"{cache.path} layer {res.layer}: the model's block output differs from the cached "
                        f"activations by {err:.2g} (relative); wrong model or layer indexing?")
        rows += [cache_rows[e.name] for e in entries]
        rows_by_cache[str(cache.path)] = cache_rows

    try:
        if cfg.interpret.enabled:
            _interpret(cfg, entries, caches[0], rows_by_cache[str(caches[0].path)], models, log)
        if cfg.intervention.enabled:
            # feature discovery needs special tokens: the first eval cache that has chat-template tokens
            chat = next((c for c in caches if c.meta.regime != "bt-p"), caches[0])
            _intervene(cfg, entries, chat, rows_by_cache[str(chat.path)], models, log)
    except BaseException as exc:  # an interrupt or a failure in the long judged part: keep what is done
        _write_partial(report, rows, cfg, exc, t0)
        raise

    report["rows"] = rows
    if cfg.plots:
        report["plots"] = write_plots(rows, cfg.out / "plots")
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


def _interpret(cfg: EvalConfig, entries: list[SAEEntry], cache: ActivationCache, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """Top examples, judge and dashboard per SAE, on the first eval cache (judging is the costly part)."""
    from .interpret import run_interpretability

    settings = cfg.interpret
    for e in entries:
        row = rows[e.name]
        log(f"interpretability: {row['row_id']}")
        judge_model = None
        judge = cfg.active_judge
        if judge is not None and judge.backend == "local" and judge.model:
            judge_model = models.get(judge.model)
        summary = run_interpretability(e.path, cache.path, cfg.out / "interpret" / _safe(row["row_id"]),
                                       n_features=settings.n_features, top_n=settings.top_n, window=settings.window,
                                       judge=judge, seed=settings.seed, judge_model=judge_model)
        row["interpretability"] = {k: v for k, v in summary.items() if k != "features"}


def _intervene(cfg: EvalConfig, entries: list[SAEEntry], cache: ActivationCache, rows: dict[str, dict[str, Any]],
               models: dict[str, tuple[Any, Any]], log: Callable[[str], None]) -> None:
    """The special-token steering experiment per SAE (its features are discovered on ``cache``)."""
    from .intervention import run_intervention

    iv = cfg.intervention
    model_id = cfg.model or cache.meta.model_id
    for e in entries:
        row = rows[e.name]
        log(f"special-token intervention: {row['row_id']}")
        summary = run_intervention(e.path, cache.path, cfg.out / "intervention" / _safe(row["row_id"]),
                                   prompts=iv.prompts, alphas=iv.alphas, n_features=iv.n_features,
                                   positions=iv.positions, max_new_tokens=iv.max_new_tokens, judge=cfg.active_judge,
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
