"""The SAEBench settings of `pipeline.py evaluate` (``--saebench`` and ``--saebench-*``).

Why these defaults: they make SAEBench's offline evaluations feasible on 2 CPU cores with the
135M embedded model (docs/metrics.md "SAEBench" says how results then differ from published ones).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fast_sae.options import setting

from ..errors import EvalError

EVALS = ("absorption", "core", "sparse_probing_sae_probes")
# Binary datasets shipped inside the sae-probes wheel, short prompts (12-60 characters, so a few tokens
# each) of different kinds: a place, a sport, time and causality reading, a news headline, arithmetic.
DEFAULT_PROBE_DATASETS = ("117_us_state_FL", "154_athlete_sport_football", "131_temp_cat_Typical Time",
                          "133_context_type_Causality", "22_headline_isobama", "129_arith_mc_A")
VENV_ENV = "FAST_SAE_SAEBENCH_VENV"


def _evals(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(EVALS)
    bad = [n for n in names if n not in EVALS]
    if bad:
        raise EvalError(f"--saebench: unknown evaluation(s) {', '.join(map(repr, bad))}; expected a comma-separated "
                        f"list of {', '.join(EVALS)} (or all); the others need the hub or an API key")
    return list(dict.fromkeys(names))


def default_venv() -> Path:
    """The venv setup_saebench.sh makes: $FAST_SAE_SAEBENCH_VENV, else .venv-saebench in the checkout (in the
    working folder when the package is installed, not run from a checkout)."""
    env = os.environ.get(VENV_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]
    return (root if (root / "setup_saebench.sh").is_file() else Path.cwd()) / ".venv-saebench"


@dataclass
class SAEBenchConfig:
    """SAEBench evaluations run through the real library in its own venv (evaluate.saebench)."""

    evals: list[str] = setting(default_factory=list, flag="saebench", parse=_evals, metavar="EVAL,EVAL",
                               help="Run these SAEBench evaluations on every SAE, in .venv-saebench "
                                    "(./setup_saebench.sh): absorption, core, sparse_probing_sae_probes, or all "
                                    "[default: none].")
    venv: Path | None = setting(None, help="The SAEBench venv [default: $FAST_SAE_SAEBENCH_VENV or .venv-saebench "
                                           "in the checkout].")
    vocab_size: int = setting(3000, help="absorption: words sampled from SAEBench's alphabetic vocabulary (seeded, "
                                         "stratified by first letter; 0: all, ~47k words here, hours on a CPU).")
    min_letters: int = setting(20, help="absorption: letters whose residual probe must reach F1 > 0.6 before "
                                        "absorption is scored (SAEBench's min_feats_for_eval, 20 of 26).")
    max_k: int = setting(10, help="absorption: largest k of its k-sparse probes (SAEBench's max_k_value).")
    probe_epochs: int = setting(50, help="absorption: epochs of each k-sparse probe (SAEBench's "
                                         "k_sparse_probe_num_epochs).")
    seed: int = setting(42, help="Seed of the vocabulary sample and of SAEBench's own splits.")
    llm_batch_size: int = setting(64, help="Prompts per model forward.")
    core_context: int = setting(128, help="core: tokens per row (SAEBench's context_size).")
    core_batches: int = setting(4, help="core: batches of rows for the reconstruction/CE and sparsity passes.")
    core_batch_prompts: int = setting(8, help="core: rows per batch.")
    probe_datasets: list[str] = setting(default_factory=lambda: list(DEFAULT_PROBE_DATASETS),
                                        help="sparse_probing_sae_probes: datasets of the sae-probes wheel "
                                             "(comma-separated; docs/metrics.md lists the default subset).")
    probe_ks: list[int] = setting(default_factory=lambda: [1, 2, 5], help="sparse_probing_sae_probes: latents per "
                                                                          "probe.")
    timeout_minutes: float = setting(180.0, help="Stop the SAEBench worker after this long (its results so far "
                                                 "are kept).")
    device: str = setting("cpu", cli=False, help="Set from the evaluation's --device.")

    @property
    def enabled(self) -> bool:
        return bool(self.evals)

    def check(self) -> None:
        """One-line errors for values that cannot work."""
        if self.vocab_size < 0 or min(self.min_letters, self.llm_batch_size, self.max_k, self.probe_epochs) < 1:
            raise EvalError("--saebench-vocab-size must be >= 0, --saebench-min-letters, -llm-batch-size, -max-k and "
                            "-probe-epochs >= 1")
        if self.core_context < 2 or self.core_batches < 1 or self.core_batch_prompts < 1:
            raise EvalError("--saebench-core-context must be >= 2, --saebench-core-batches and "
                            "--saebench-core-batch-prompts >= 1")
        if not self.probe_ks or min(self.probe_ks) < 1:
            raise EvalError("--saebench-probe-ks: expected positive numbers of latents, e.g. 1,2,5")
        if "sparse_probing_sae_probes" in self.evals and not self.probe_datasets:
            raise EvalError("--saebench-probe-datasets: name at least one sae-probes dataset")
        if self.timeout_minutes <= 0:
            raise EvalError("--saebench-timeout-minutes must be > 0")

    def venv_python(self) -> Path:
        """The venv's interpreter; a missing venv is one line saying how to make it."""
        venv = self.venv or default_venv()
        py = venv / "bin" / "python"
        if not py.is_file():
            raise EvalError(f"{venv}: no SAEBench venv (needed by --saebench); create it with ./setup_saebench.sh "
                            f"(./setup.sh does unless FAST_SAE_NO_SAEBENCH=1) or point --saebench-venv at one")
        return py
