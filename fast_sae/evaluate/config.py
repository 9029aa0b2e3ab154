"""The evaluation's configuration: which SAEs, on which cache tokens, which parts, with which settings.

Why apart from the runner: these dataclasses define the `pipeline.py evaluate` options (through
``fast_sae.options``), so the CLI imports them without the evaluation code, and tests and notebooks
build them directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fast_sae.options import setting

from .downstream import DownstreamConfig
from .errors import EvalError
from .interpret.config import JudgeConfig
from .probes import ProbeConfig
from .reconstruction import ReconstructionConfig
from .saebench.config import SAEBenchConfig
from .sources import parse_aliases, parse_range


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

    enabled: bool = setting(False, flag="intervention", help="Steer the model with the SAE's special-token "
                                                             "features: reference-reply likelihood against "
                                                             "controls, and generated replies (judged when the "
                                                             "judge passes its calibration).")
    alphas: tuple[float, ...] = setting((0, 15, 25, 50), flag="alphas", help="Steering strengths.")
    n_features: int = setting(1, help="Features to steer with (discovered on special tokens).")
    features: list[int] | None = setting(None, help="Feature ids [default: discovered].")
    positions: str = setting("all", choices=("all", "special"), help="Where to steer.")
    mode: str = setting("add", choices=("add", "scale"), help="Add alpha x decoder direction, or scale the feature.")
    direction: str = setting("unit", choices=("unit", "raw_folded"),
                             help="add mode: the unit-norm decoder direction (the paper's d_k), or the folded "
                                  "checkpoint row as stored (its norm depends on the training normalisation).")
    max_new_tokens: int = setting(48, help="Reply length.")
    generate: bool = setting(True, help="Generate replies to the prompts under steering (and judge them when a "
                                        "judge is on).")
    likelihood: bool = setting(True, help="Judge-free measure: log-likelihood of held-out reference replies "
                                          "under steering, against random directions and frequency-matched "
                                          "random features.")
    conversations: int = setting(16, help="Held-out conversations of the likelihood measure.")
    reply_tokens: int = setting(32, help="Reference-reply tokens scored per conversation.")
    random_directions: int = setting(4, help="Random unit directions (control 1).")
    matched_features: int = setting(4, help="Random SAE features of matched activation frequency per steered "
                                            "feature (control 2).")
    seed: int = setting(0, help="Seed of the conversation sample and the controls.")
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
    eval_range: tuple[int, ...] | None = setting(None, parse=parse_range, metavar="START:STOP[:STEP]",
                                                 help="Use exactly these sequences of the eval cache (overrides "
                                                      "the held-out rule).")
    allow_overlap: bool = setting(False, help="Evaluate even when an SAE was trained on some of the eval documents "
                                              "(refused otherwise); the report then carries a loud warning.")
    model: str | None = setting(None, help="Model for downstream/intervention [default: the cache's model_id].")
    model_aliases: list[tuple[str, str]] = setting(
        default_factory=list, flag="model-alias", parse=parse_aliases, metavar="SAE_MODEL=CACHE_MODEL",
        help="Score SAEs trained on model SAE_MODEL on caches of CACHE_MODEL: the two ids are the same weights "
             "(warned; comma-separated for several). Built in: HuggingFaceTB/SmolLM2-135M-Instruct = "
             "embedded:SmolLM2-135M-Instruct (warned as de-quantised).")
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
    probes: ProbeConfig = setting(default_factory=ProbeConfig, prefix="probe-", help="Chat-structure probes.")
    saebench: SAEBenchConfig = setting(default_factory=SAEBenchConfig, prefix="saebench-", help="SAEBench.")

    def __post_init__(self) -> None:
        """One --device and --progress for every part; 0 tokens means no cap."""
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        for part in (self.reconstruction, self.downstream, self.judge, self.probes):
            part.device = self.device
        self.reconstruction.progress = self.downstream.progress = self.probes.progress = self.progress
        self.probes.check()
        self.saebench.device = self.device
        self.saebench.check()
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
