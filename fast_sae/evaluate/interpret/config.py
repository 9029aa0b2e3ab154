"""Configuration of the LLM judge, shared by interpretability scoring and the intervention.

Why a dataclass of plain values: the CLI builds it from flags, it is written verbatim into the
result files, and every field that changes a judge's answer (backend, model, prompt, length) is
part of the on-disk cache key, so a changed setting never reuses a stale answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fast_sae.lm import EMBEDDED_MODEL
from fast_sae.options import setting

from ..errors import EvalError

BACKENDS = ("local", "openai")
NOT_CALIBRATED = ("not meaningful: the judge was not calibrated (a judge is believed only after it separates "
                  "known cases, evaluate.interpret.calibration; --judge-calibrate)")


@dataclass
class JudgeConfig:
    """Which LLM judges, and how.

    backend: "local" (a transformers model loaded through fast_sae.lm, greedy, chat template) or
        "openai" (any OpenAI-compatible ``/v1/chat/completions`` endpoint: vLLM, a hosted API).
    model: model id; for "local" any hub id / folder / the embedded model (default), for "openai"
        the served model name.
    base_url: endpoint root for "openai", e.g. ``http://127.0.0.1:8000/v1`` (with or without ``/v1``).
    api_key_env: name of the environment variable holding the API key (unset: no auth header);
        the key itself is never stored in a config or result file.
    max_new_tokens: reply length budget per call.
    retries: extra attempts after a malformed reply or a failed call (attempt 0 is greedy,
        later attempts sample at ``retry_temperature`` so a deterministic judge can change its mind).
    cache_dir: where replies are cached (None: ``<out_dir>/judge_cache``).
    timeout_s: total time allowed per judge reply ("openai"): connect, send and the whole reply,
        however slowly the server sends it.
    enabled: whether the evaluation asks the judge at all (the settings stay in the report either way).
    constrained: "local" only: build the reply in the prompt's answer format (most likely score,
        generated name) instead of hoping a small model writes the verdict line; see LocalBackend.
    calibrate / calibration_cases / calibration_min_auc: before any score is reported, the judge scores
        known cases (calibration.py); its scores are called meaningful only if it passes.
    calibration: the calibration result (set by the evaluation, not an option); None = not calibrated.
    """

    enabled: bool = setting(True, flag="judge", help="Ask the LLM judge (with --interpret / --intervention); "
                                                    "off: examples and dashboard only.")
    backend: str = setting("local", choices=BACKENDS, help="local: a transformers model; openai: an "
                                                           "OpenAI-compatible endpoint.")
    model: str | None = setting(None, help="Judge model [default: the embedded instruct model for local; "
                                           "required for openai].")
    base_url: str | None = setting(None, flag="judge-url", help="OpenAI-compatible endpoint, e.g. "
                                                                "http://127.0.0.1:8000/v1.")
    api_key_env: str | None = setting("OPENAI_API_KEY", help="Environment variable holding the judge API key.")
    max_new_tokens: int = setting(64, help="Reply length budget per judge call.")
    retries: int = setting(2, help="Extra attempts after a malformed reply or a failed call.")
    cache_dir: Path | None = setting(None, flag="judge-cache", help="Folder of cached judge replies "
                                                                    "[default: per SAE under --out].")
    timeout_s: float = setting(120.0, flag="judge-timeout", help="Total seconds allowed per judge reply, "
                                                                 "however slowly it arrives (openai).")
    retry_temperature: float = setting(0.7, cli=False, help="Sampling temperature of retries.")
    device: str = setting("cpu", cli=False, help="Set from the evaluation's --device.")
    constrained: bool = setting(True, cli=False, help="local: build the reply in the prompt's answer format.")
    structured: bool = setting(False, help="openai: ask the server to decode only replies in the answer format "
                                           "(vLLM's structured_outputs regex; hosted APIs reject it).")
    calibrate: bool = setting(True, flag="judge-calibrate", help="Score known cases first (planted vs random "
                                                                 "features, matching vs mismatched explanations); "
                                                                 "judge scores count only if it passes.")
    calibration_cases: int = setting(8, flag="judge-calibration-cases",
                                     help="Calibration cases of each kind (per task: this many positives and "
                                          "negatives).")
    calibration_min_auc: float = setting(0.75, flag="judge-calibration-min-auc",
                                         help="AUC both calibration tasks must reach for the judge to pass.")
    calibration: dict[str, Any] | None = setting(None, cli=False, help="The calibration result (set by the run).")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise EvalError(f"judge backend {self.backend!r}: expected one of {BACKENDS}")
        if self.model is None and self.backend == "local":
            self.model = EMBEDDED_MODEL
        if self.enabled and self.backend == "openai":
            if not self.base_url:
                raise EvalError("judge backend 'openai' needs base_url (--judge-url, e.g. http://127.0.0.1:8000/v1)")
            if not self.model:
                raise EvalError("judge backend 'openai' needs the served model name (--judge-model)")
        if not self.timeout_s > 0:
            raise EvalError(f"judge timeout must be positive, got {self.timeout_s}")
        if self.retries < 0 or self.max_new_tokens < 1:
            raise EvalError("judge retries must be >= 0 and max_new_tokens >= 1")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.calibration_cases < 2 or not 0.5 <= self.calibration_min_auc <= 1:
            raise EvalError("--judge-calibration-cases must be >= 2 and --judge-calibration-min-auc in [0.5, 1]")

    @property
    def scores_meaningful(self) -> bool:
        """Whether the judge passed its calibration (measured, never assumed from the backend or model)."""
        return bool(self.calibration and self.calibration.get("passed"))

    @property
    def note(self) -> str | None:
        """Why the scores are not meaningful (None when they are)."""
        if self.scores_meaningful:
            return None
        if not self.calibration:
            return NOT_CALIBRATED
        return "not meaningful: " + str(self.calibration.get("line", "judge calibration failed"))

    def describe(self) -> dict:
        """JSON-safe summary for result files (no secrets: only the env var's name)."""
        cal = self.calibration
        return {"scores_meaningful": self.scores_meaningful, "note": self.note,
                "calibration": None if not cal else {k: cal.get(k) for k in ("passed", "line", "tasks", "min_auc",
                                                                             "cases_per_kind", "file")},
                "backend": self.backend, "model": self.model, "base_url": self.base_url,
                "api_key_env": self.api_key_env, "max_new_tokens": self.max_new_tokens,
                "retries": self.retries, "retry_temperature": self.retry_temperature,
                "constrained": self.constrained if self.backend == "local" else None,
                "structured": self.structured if self.backend == "openai" else None}
