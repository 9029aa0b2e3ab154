"""The convergence study's plan: caches, training runs and evaluations, each a public command.

Why separate runs per training length (a "ladder" of budgets) rather than snapshots of one long
run: the learning rate follows a schedule over the whole run (warm-up, cosine, a final decay to
zero), so a snapshot at 25% of a run is an SAE caught at a high learning rate, not an SAE trained
on 25% of the tokens. Each rung is a complete run of its own length, which is how a user would
train at that budget; the cost is the sum of the rungs (~1.9x the longest with the default ladder).

The runs (every one resumable: `train` resumes a killed run bit-exactly, a finished one is skipped):
- ``core``: TopK and BatchTopK at one k (matched L0 by construction), per regime and seed, at the
  paper's tokens per latent (1,430: 40.96M tokens / 8 x 3,584 latents);
- ``ladder``: the same at the other budgets of ``tokens_per_latent`` (the gap against training
  length, and whether doubling the budget still changes held-out MSE);
- ``sweeps``: Standard (L1) and JumpReLU (L0) sparsity sweeps, seed 0, at ``sweep_tokens_per_latent``,
  compared on their MSE-L0 frontiers at matched L0 by `pipeline.py compare`.
Every SAE is evaluated on three held-out formats (FAST conversations, the same conversations
packed as BT(F) blocks, held-out BT(P) documents) and on a sample of its own training cache (the
same filters: how much of the fit is memorised, since the small chat corpus is seen many times).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from fast_sae.demo import DemoConfig, _csv, _run, check_held_out, harvest_commands
from fast_sae.options import setting

REGIMES = ("fast", "bt-f", "bt-p")
EVAL_CACHES = {"fast": "fast-eval", "bt-f": "bt-f-eval", "bt-p": "bt-p-eval"}  # eval format -> cache folder
PAPER_TOKENS_PER_LATENT = 40_960_000 / (8 * 3584)  # ~1,428.6
PARTS = ("core", "ladder", "sweeps")


@dataclass
class ConvergeConfig:
    """The study's sizes; every field is also a `pipeline.py converge` option."""

    out: Path = setting(Path("runs/converge"), help="Folder for the study's runs, evaluations and report.")
    caches: Path = setting(Path("runs/demo/caches"), help="The demo's caches (made here if missing): FAST, BT(F), "
                                                          "BT(P) training caches and the held-out eval caches.")
    parts: list[str] = setting(default_factory=lambda: list(PARTS), help="Which runs: core (TopK/BatchTopK at the "
                                                                         "paper's tokens per latent, every seed), "
                                                                         "ladder (the other budgets), sweeps "
                                                                         "(Standard/JumpReLU frontiers).")
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], help="Seeds (init and data order) of the "
                                                                       "TopK/BatchTopK cells.")
    k: int = setting(32, help="k of the TopK and BatchTopK cells.")
    expansion_factor: int = setting(2, help="d_sae / d_model.")
    core_tokens_per_latent: float = setting(1430.0, help="Budget of the core runs, in training tokens per latent "
                                                         "(paper: 40.96M / (8 x 3,584) = 1,430).")
    tokens_per_latent: list[float] = setting(default_factory=lambda: [357.5, 715.0, 2860.0],
                                             help="The ladder's other budgets (tokens per latent).")
    sweep_tokens_per_latent: float = setting(1430.0, help="Budget of the Standard/JumpReLU sweeps.")
    l1_coefficients: list[float] = setting(default_factory=lambda: [0.1, 0.3, 1.0, 3.0],
                                           help="Standard SAE sweep (L1 coefficients).")
    l0_coefficients: list[float] = setting(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0],
                                           help="JumpReLU sweep (L0 coefficients).")
    batch_tokens: int = setting(1024, help="Tokens per optimiser step.")
    lr: float = setting(5e-4, help="Adam learning rate (decays to a tenth, then to 0 over the last fifth).")
    fit_sample_tokens: int = setting(12_000, help="Tokens of each training cache scored to compare the fit on "
                                                  "seen documents with held-out MSE.")
    time_limit_minutes: float | None = setting(None, help="Start no new run after this many minutes (rerun to "
                                                          "continue); the study can be run in parts.")
    harvest_tokens: int = setting(DemoConfig.tokens, help="Tokens of each training cache harvested when missing "
                                                          "(the demo's).")
    eval_tokens: int = setting(DemoConfig.eval_tokens, help="Token cap of each held-out eval cache harvested when "
                                                            "missing.")
    context_size: int = setting(DemoConfig.context_size, help="FAST truncation / BT block length of the harvests.")
    layer: int = setting(DemoConfig.layer, help="Decoder block.")

    def __post_init__(self) -> None:
        bad = sorted(set(self.parts) - set(PARTS))
        if bad:
            raise click.BadParameter(f"--parts {bad[0]!r}: expected some of {', '.join(PARTS)}")

    @property
    def demo(self) -> DemoConfig:
        """The demo's harvest settings (same held-out rule) at this study's sizes."""
        return DemoConfig(out=self.caches.parent, tokens=self.harvest_tokens, eval_tokens=self.eval_tokens,
                          context_size=self.context_size, layer=self.layer)


@dataclass
class Run:
    """One `pipeline.py train` run of the study."""

    part: str
    regime: str
    name: str
    folder: Path
    args: list[str]
    seed: int
    tokens_per_latent: float
    architectures: list[str] = field(default_factory=list)


def cache_paths(c: ConvergeConfig) -> dict[str, Path]:
    """Training caches by regime and eval caches by ``<format>-eval`` name."""
    return {**{r: c.caches / r for r in REGIMES}, **{v: c.caches / v for v in EVAL_CACHES.values()}}


def study_harvests(c: ConvergeConfig) -> list[list[str]]:
    """The demo's harvests (held-out FAST eval cache, three training caches) plus the held-out
    conversations packed as BT(F) blocks and held-out BT(P) documents (same seed and share)."""
    d = c.demo
    split = ["--docs", "holdout", "--holdout-fraction", str(d.holdout_fraction), "--holdout-seed", str(d.holdout_seed),
             "--max-tokens", str(d.eval_tokens), "--layers", str(d.layer), "--context-size", str(d.context_size)]
    extra = [["harvest", "--out", str(c.caches / EVAL_CACHES[r]), "--regime", r, *split] for r in ("bt-f", "bt-p")]
    return harvest_commands(d, c.caches) + extra


def budget_tokens(c: ConvergeConfig, tokens_per_latent: float, d_model: int) -> int:
    """Training tokens for a budget in tokens per latent, rounded down to whole batches."""
    d_sae = d_model * c.expansion_factor
    return max(1, int(tokens_per_latent * d_sae) // c.batch_tokens) * c.batch_tokens


def _train_args(c: ConvergeConfig, regime: str, folder: Path, tokens: int, seed: int, grid: list[str]) -> list[str]:
    steps = tokens // c.batch_tokens
    paths = cache_paths(c)
    return ["train", str(paths[regime]), "--out", str(folder), "--layers", str(c.layer), *grid,
            "--expansion-factors", str(c.expansion_factor), "--tokens", str(tokens),
            "--batch-tokens", str(c.batch_tokens), "--lr", f"{c.lr:g}", "--lr-end", f"{c.lr / 10:g}",
            "--buffer-tokens", "32768", "--log-every", str(max(1, steps // 100)),
            "--checkpoint-every", str(max(50, steps // 8)), "--eval-sequences", "0", "--seed", str(seed),
            "--normalize", "content", "--normalize-from", str(paths["fast"])]


def _tpl_tag(t: float) -> str:
    return f"tpl{t:g}"


def plan_runs(c: ConvergeConfig, d_model: int) -> list[Run]:
    """Every training run of the selected parts, in the order they run: the core budget, the shorter
    rungs of the ladder, the sweeps, then the longer rungs (the costliest last)."""
    def topk_runs(part: str, tpl: float) -> list[Run]:
        out = []
        for seed in c.seeds:
            for regime in REGIMES:
                name = f"topk_{_tpl_tag(tpl)}_seed{seed}"
                folder = c.out / "runs" / regime / name
                grid = ["--architectures", "topk,batchtopk", "--k", str(c.k)]
                out.append(Run(part, regime, name, folder, _train_args(c, regime, folder, budget_tokens(
                    c, tpl, d_model), seed, grid), seed, tpl, ["topk", "batchtopk"]))
        return out

    def sweep_runs() -> list[Run]:
        """One run per architecture and regime, so each sweep can be widened on its own."""
        tpl, out = c.sweep_tokens_per_latent, []
        for arch, flag, values in (("standard", "--l1-coefficients", c.l1_coefficients),
                                   ("jumprelu", "--l0-coefficients", c.l0_coefficients)):
            for regime in REGIMES:
                name = f"sweep_{arch}_{_tpl_tag(tpl)}_seed0"
                folder = c.out / "runs" / regime / name
                grid = ["--architectures", arch, flag, _csv(values)]
                out.append(Run("sweeps", regime, name, folder, _train_args(c, regime, folder, budget_tokens(
                    c, tpl, d_model), 0, grid), 0, tpl, [arch]))
        return out

    ladder = sorted(t for t in set(c.tokens_per_latent) if t != c.core_tokens_per_latent)
    runs: list[Run] = []
    if "core" in c.parts:
        runs += topk_runs("core", c.core_tokens_per_latent)
    if "ladder" in c.parts:
        runs += [r for t in ladder if t < c.core_tokens_per_latent for r in topk_runs("ladder", t)]
    if "sweeps" in c.parts:
        runs += sweep_runs()
    if "ladder" in c.parts:
        runs += [r for t in ladder if t > c.core_tokens_per_latent for r in topk_runs("ladder", t)]
    return runs


def eval_folder(c: ConvergeConfig, run: Run, kind: str) -> Path:
    """``kind``: "heldout" (the three held-out formats) or "fit" (a sample of the run's training cache)."""
    return c.out / "eval" / kind / run.regime / run.name


def fit_range(cache_path: Path, tokens: int) -> str:
    """Every n-th sequence of a training cache, about ``tokens`` tokens, as --eval-range START:STOP:STEP:
    spread over the whole cache, since caches are in dataset order and the embedded corpus is sorted
    by topic (the first sequences would be one topic, unlike the held-out sample)."""
    from fast_sae.actcache import ActivationCache

    starts = ActivationCache.open(cache_path).seq_starts()
    n_seq, n_tok = len(starts) - 1, int(starts[-1])
    step = max(1, round(n_tok / max(tokens, 1)))
    return f"0:{n_seq}:{step}"


def eval_commands(c: ConvergeConfig, run: Run) -> dict[str, list[str]]:
    paths = cache_paths(c)
    common = ["--no-downstream", "--no-plots", "--max-eval-tokens", "0"]
    held = ["evaluate", "--sae", str(run.folder), *[a for f in REGIMES for a in ("--eval-cache", str(paths[
        EVAL_CACHES[f]]))], "--out", str(eval_folder(c, run, "heldout")), *common]
    fit = ["evaluate", "--sae", str(run.folder), "--eval-cache", str(paths[run.regime]), "--eval-range",
           fit_range(paths[run.regime], c.fit_sample_tokens), "--allow-overlap", "--out",
           str(eval_folder(c, run, "fit")), *common]
    return {"heldout": held, "fit": fit}


STAMP = "converge_command.json"


def _fresh(folder: Path, run: Run, args: list[str]) -> bool:
    """An evaluation is current when its report is newer than the run's summary (a finished run) and
    was made by the same command (the study's stamp beside it)."""
    report, summary, stamp = folder / "report.json", run.folder / "summary.json", folder / STAMP
    if not (report.is_file() and summary.is_file() and stamp.is_file()):
        return False
    try:
        same = json.loads(stamp.read_text()) == args
    except ValueError:
        return False
    return same and report.stat().st_mtime >= summary.stat().st_mtime


def sweep_compare(c: ConvergeConfig, runs: list[Run]) -> list[str] | None:
    """`pipeline.py compare` over the sweeps' held-out evaluations (the frontiers at matched L0)."""
    sweeps = [r for r in runs if r.part == "sweeps" and (eval_folder(c, r, "heldout") / "report.json").is_file()]
    if len(sweeps) < 2:
        return None
    return ["compare", *[str(eval_folder(c, r, "heldout")) for r in sweeps], "--out", str(c.out / "sweeps_compare")]


def execute(c: ConvergeConfig, echo: Any = click.echo) -> dict[str, Any]:
    """Harvest what is missing, train and evaluate every pending run (stopping new work after the
    time limit), compare the sweeps; returns what was done."""
    from fast_sae.actcache import ActivationCache

    t0 = time.perf_counter()
    for args in study_harvests(c):
        out = Path(args[args.index("--out") + 1])
        try:
            complete = ActivationCache.open(out).complete
        except Exception:  # not there yet (or unreadable: the harvest itself says why)
            complete = False
        if not complete:
            _run(args)
    paths = cache_paths(c)
    n_held, _ = check_held_out(paths["fast-eval"], [paths[r] for r in ("fast", "bt-f")])
    check_held_out(paths["bt-p-eval"], [paths["bt-p"]])
    d_model = ActivationCache.open(paths["fast"]).meta.d_model
    runs = plan_runs(c, d_model)
    done: list[str] = []
    stopped = False
    for run in runs:
        if c.time_limit_minutes is not None and time.perf_counter() - t0 > 60 * c.time_limit_minutes:
            stopped = True
            break
        if not (run.folder / "summary.json").is_file():
            _run(run.args)
        for kind, args in eval_commands(c, run).items():
            folder = eval_folder(c, run, kind)
            if not _fresh(folder, run, args):
                _run(args)
                (folder / STAMP).write_text(json.dumps(args))
        done.append(f"{run.regime}/{run.name}")
    cmp = sweep_compare(c, runs)
    if cmp is not None and not stopped:
        _run(cmp)
    return {"runs": runs, "done": done, "stopped": stopped, "held_out_documents": n_held,
            "seconds": time.perf_counter() - t0}
