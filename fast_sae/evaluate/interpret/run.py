"""``run_interpretability``: top examples -> (optional) LLM judge -> dashboard, for one SAE.

Why one entry point: the CLI (fast_sae/evaluate/cli.py) calls this per SAE behind a flag and only needs the
summary dict it returns (score-band shares and file paths) for its report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import LoadedSAE, load_sae

from .config import JudgeConfig
from .dashboard import write_dashboard
from .judge import ReplyCache, load_prompt, score_bands, score_features
from .judge_backends import make_backend
from .top_examples import (
    TokenRenderer,
    collect_top_examples,
    feature_contexts,
    live_features,
    sae_layer,
    sample_features,
)

JUDGE_PROMPT = "judge_v1"


def run_interpretability(sae_dir: Path | LoadedSAE, cache_path: Path | ActivationCache, out_dir: Path, *,
                         n_features: int = 32, top_n: int = 5, window: int = 8, judge: JudgeConfig | None = None,
                         seed: int = 0, judge_model: tuple[Any, Any] | None = None, device: str = "cpu",
                         token_ranges: list[tuple[int, int]] | None = None, name: str | None = None) -> dict:
    """Score one SAE's interpretability on a cache (the paper's §5.3 protocol, sizes configurable).

    ``sae_dir`` / ``cache_path`` may be a loaded SAE / an opened cache (the evaluation passes its own,
    with ``name`` for titles). ``token_ranges`` restricts every read to those tokens (the held-out
    eval sequences): examples and statistics then come from held-out documents only.

    1. Stream the SAE's layer of the cache (or ``token_ranges``): per feature the ``top_n``
       highest-activating contexts (one per sequence and distinct: a token whose id and ``window``
       ids before it repeat counts once, with its copies; examples in the shared prefix are marked;
       ``top_examples.py``), shown ``window`` tokens either side of the arg-max token; density, max and
       mean activation.
    2. Sample ``n_features`` live features (seeded by ``seed``; all live ones if fewer).
    3. If ``judge`` is given, ask the judge (prompt ``fast_sae/evaluate/prompts/judge_v1.md``) for a 1-5
       Activation Consistency score and a name per sampled feature; replies are cached under
       ``judge.cache_dir`` (default ``out_dir/judge_cache``); malformed replies are retried
       ``judge.retries`` times, then recorded as unscored with the reason.
    4. Write ``out_dir/top_examples.json`` (density/max of every feature, contexts of the sampled
       ones), ``out_dir/judge_scores.json`` (only when judged: per-feature records and score bands)
       and ``out_dir/dashboard.html``.

    ``judge_model`` optionally passes an already loaded (model, tokenizer) to the local judge;
    ``device`` is where the SAE encodes the cache (e.g. "cuda"; the top-k tables stay on the CPU).
    Returns a JSON-safe summary: counts, dead fraction, ``scores`` (``judge.score_bands``: share per
    score, ``top_range_share`` for 4-5, CDF; None without a judge) and ``files`` (name -> path).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sae = sae_dir if isinstance(sae_dir, LoadedSAE) else load_sae(Path(sae_dir), device=device)
    cache = cache_path if isinstance(cache_path, ActivationCache) else ActivationCache.open(cache_path)
    sae_label = name or (str(sae_dir) if not isinstance(sae_dir, LoadedSAE) else "sae")
    layer = sae_layer(sae, cache)
    top = collect_top_examples(sae, cache, top_n, layer=layer, token_ranges=token_ranges, distinct_window=window)
    features = sample_features(top, n_features, seed)
    reports = feature_contexts(sae, cache, top, features, window=window, render=TokenRenderer.for_cache(cache),
                               layer=layer)
    n_live = int(len(live_features(top)))
    d_sae = int(sae.d_sae)
    files: dict[str, str] = {}

    top_file = out_dir / "top_examples.json"
    top_file.write_text(json.dumps({
        "sae": sae_label, "cache": str(cache.path), "layer": layer, "d_sae": d_sae, "top_n": top_n,
        "window": window, "seed": seed, "n_tokens": top.stats.n_tokens, "n_live": n_live,
        "selection_rule": top.selection_rule(), "shared_prefix_length": top.prefix_length,
        "token_ranges": [list(r) for r in token_ranges] if token_ranges is not None else None,
        "density": np.round(top.stats.density, 8).tolist(), "max_act": top.stats.max_act.tolist(),
        "features": reports}, ensure_ascii=False))
    files["top_examples"] = str(top_file)

    records: list[dict] | None = None
    bands = None
    if judge is not None:
        backend = make_backend(judge, **({} if judge_model is None else
                                         {"model": judge_model[0], "tokenizer": judge_model[1]}))
        prompt = load_prompt(JUDGE_PROMPT)
        reply_cache = ReplyCache(judge.cache_dir or out_dir / "judge_cache")
        judge_file = out_dir / "judge_scores.json"
        head = {"judge": judge.describe(), "prompt": prompt.version, "prompt_sha256": prompt.sha256}
        judged: list[dict] = []
        try:
            score_features(reports, backend, reply_cache, retries=judge.retries, prompt=prompt, into=judged)
        except BaseException as exc:  # interrupted: keep the features judged so far
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'interrupted'}"
            judge_file.write_text(json.dumps({**head, "incomplete": why, "backend_calls": backend.calls,
                                              "bands": score_bands(judged) | {"meaningful": judge.scores_meaningful},
                                              "records": judged},
                                             indent=1, ensure_ascii=False))
            raise
        records, bands = judged, score_bands(judged) | {"meaningful": judge.scores_meaningful}
        judge_file.write_text(json.dumps({**head, "backend_calls": backend.calls, "bands": bands,
                                          "records": records}, indent=1, ensure_ascii=False))
        files["judge_scores"] = str(judge_file)

    summary = {"sae": sae_label, "cache": str(cache.path), "layer": layer, "d_sae": d_sae,
               "n_tokens": top.stats.n_tokens, "n_live": n_live, "dead_fraction": 1 - n_live / d_sae,
               "n_features_sampled": len(features), "features": features,
               "judge": judge.describe() if judge else None, "scores": bands, "files": files,
               "held_out_only": token_ranges is not None, "selection_rule": top.selection_rule()}
    dash = write_dashboard(out_dir / "dashboard.html", title=f"SAE features: {Path(sae_label).name} (layer {layer})",
                           reports=reports, density=top.stats.density, judged=records,
                           summary={k: summary[k] for k in ("sae", "cache", "layer", "d_sae", "n_tokens", "n_live")}
                           | ({"top_range_share (4-5)": bands["top_range_share"]} if bands else {}),
                           judge_note=None if judge is None else judge.note,
                           selection_rule=top.selection_rule())
    files["dashboard"] = str(dash)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary
