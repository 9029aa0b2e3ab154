"""Interpretability of SAE features (FAST paper §5.3): top-activating contexts from the cache, an
LLM judge scoring Activation Consistency 1-5 (local transformers model or OpenAI-compatible HTTP),
and a static HTML dashboard.

Entry points:
- ``run_interpretability(sae_dir, cache_path, out_dir, *, n_features=32, top_n=5, window=8,
  judge=None, seed=0, judge_model=None, device="cpu") -> dict`` (see ``run.py``): writes
  top_examples.json, judge_scores.json (only when judged) and dashboard.html; returns a summary with
  score-band shares (``scores``) and file paths (``files``).
- ``JudgeConfig``: backend "local" | "openai", model, base_url, api_key_env, max_new_tokens,
  retries, cache_dir, timeout_s, retry_temperature, device, constrained.
- ``parse_verdict`` / ``parse_quality`` raise ``JudgeParseError`` on malformed replies;
  ``BackendError`` is a failed judge call (both are recorded per item, never raised by the runs).
- ``calibration.calibrate(backend, cache, out_dir, ...)``: the judge scores known cases first; its
  AUC decides ``JudgeConfig.scores_meaningful`` (set ``JudgeConfig.calibration`` to the result).
Modules: ``top_examples`` (streaming exact top-k), ``judge`` (prompts, strict parsing, reply cache,
bands), ``judge_backends`` (local / HTTP), ``calibration`` (known cases, AUC), ``dashboard`` (HTML),
``run`` (orchestration).
"""
from .config import JudgeConfig
from .judge import BackendError, JudgeParseError, parse_quality, parse_verdict, score_bands
from .run import run_interpretability

__all__ = ["BackendError", "JudgeConfig", "JudgeParseError", "parse_quality", "parse_verdict",
           "run_interpretability", "score_bands"]
