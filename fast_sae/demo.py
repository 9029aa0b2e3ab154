"""`pipeline.py demo`: the whole study on the embedded default, FAST against BT(F) and BT(P).

It only chains the public commands, printing each as a command line a user could type (so the
same study on any model is these commands with other values):
1. harvest: one FAST *evaluation* cache of a seeded random sample of the chat corpus's documents
   (``--docs holdout``), and the three training caches without them: FAST and BT(F) of every other
   conversation (``--docs train``, the same seed and share), BT(P) of plain text (another dataset,
   whose held-out documents `pipeline.py converge` scores the SAEs on);
2. train: per regime one grid, a small sparsity sweep per architecture (L1 / L0 coefficients, k),
   every regime with one shared normalisation constant taken from the FAST training cache
   (``--normalize-from``; ``--normalize none`` trains on raw activations);
3. evaluate every SAE on the evaluation cache (held-out documents; evaluate refuses overlap);
4. compare at matched L0: frontier plots, the matched-L0 table on every token filter, training
   curves with the plateau criterion.
It also checks, from the caches' doc ids, that no held-out document is in any training cache of
the same dataset. Rerunning resumes or skips what is already done.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from fast_sae.options import click_options, from_options, setting

CONVERGED_NOTE = ("These are short runs (400k tokens per SAE, ~350 tokens per latent, one seed): the first rung of "
                  "`pipeline.py converge`, which trains the same SAEs to 2x the paper's tokens per latent with 3 "
                  "seeds and scores them on three held-out formats (bench/RESULTS.md).")


def _run(args: list[str]) -> None:
    from fast_sae.cli import cli

    click.secho("\n$ python3 pipeline.py " + " ".join(shlex.quote(a) for a in args), bold=True)
    cli.main(args=args, prog_name="pipeline.py", standalone_mode=False)


def _csv(values: list[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass
class DemoConfig:
    """The study's sizes; every field is also a `pipeline.py demo` option."""

    out: Path = setting(Path("runs/demo"), help="Folder for caches, runs, evaluation and comparison.")
    tokens: int = setting(60_000, help="Tokens harvested per training cache (FAST, BT(F), BT(P)).")
    eval_tokens: int = setting(20_000, help="Token cap of the held-out FAST evaluation cache.")
    holdout_fraction: float = setting(0.1, help="Share of the chat corpus's conversations held out for evaluation.")
    holdout_seed: int = setting(0, help="Seed of the held-out sample.")
    layer: int = setting(15, help="Decoder block (SmolLM2 has 30).")
    context_size: int = setting(512, help="FAST truncation / BT block length.")
    architectures: list[str] = setting(default_factory=lambda: ["standard", "jumprelu", "topk", "batchtopk"],
                                       help="SAE architectures.")
    expansion_factor: int = setting(2, help="d_sae / d_model.")
    l1_coefficients: list[float] = setting(default_factory=lambda: [1.0, 3.0, 10.0],
                                           help="Standard SAE sweep (L1 coefficients).")
    l0_coefficients: list[float] = setting(default_factory=lambda: [0.01, 0.1, 1.0],
                                           help="JumpReLU sweep (L0 coefficients).")
    k: list[int] = setting(default_factory=lambda: [16, 32, 64], help="TopK / BatchTopK sweep (k).")
    train_tokens: int = setting(400_000, help="Training tokens per SAE (several passes over a small cache).")
    batch_tokens: int = setting(1024, help="Tokens per optimiser step.")
    lr: float = setting(5e-4, help="Adam learning rate (decays to a tenth).")
    normalize: str = setting("content", choices=("content", "all", "none"),
                             help="The shared normalisation: a robust statistic of the FAST training cache, or "
                                  "none (raw activations).")
    downstream_sequences: int = setting(8, help="Held-out conversations of the downstream loss.")
    interpret: bool = setting(True, help="Top examples and dashboards per SAE (held-out conversations only).")
    judge: bool = setting(False, help="Also score features with the local judge (the embedded 135M model; it is "
                                      "calibrated first and fails, so its scores are marked not meaningful; "
                                      "slow on a CPU).")
    n_features: int = setting(8, help="Features per SAE in the dashboards / sent to the judge.")


def check_held_out(eval_cache: Path, training: list[Path]) -> tuple[int, dict[str, int]]:
    """Held-out documents found in each training cache of the same dataset (must be none): one line error else."""
    from fast_sae.actcache import ActivationCache

    ev = ActivationCache.open(eval_cache)
    held = np.unique(ev.doc_ids())
    found: dict[str, int] = {}
    for path in training:
        c = ActivationCache.open(path)
        if c.meta.dataset != ev.meta.dataset:
            continue
        n = int(np.isin(held, np.unique(c.doc_ids())).sum())
        if n:
            raise click.ClickException(f"{path}: {n} of the {len(held)} held-out documents of {eval_cache} are in "
                                       f"this training cache")
        found[str(path)] = n
    return len(held), found


def harvest_commands(d: DemoConfig, caches_dir: Path) -> list[list[str]]:
    """The harvests of the study: the held-out FAST evaluation cache (``fast-eval``) first, then the
    training caches ``fast``, ``bt-f`` and ``bt-p`` without the held-out documents."""
    split = ["--holdout-fraction", str(d.holdout_fraction), "--holdout-seed", str(d.holdout_seed)]
    common = ["--layers", str(d.layer), "--context-size", str(d.context_size)]
    cmds = [["harvest", "--out", str(caches_dir / "fast-eval"), "--regime", "fast", "--docs", "holdout", *split,
             "--max-tokens", str(d.eval_tokens), *common]]
    for regime in ("fast", "bt-f", "bt-p"):  # BT(P) reads another dataset, with the same held-out rule
        cmds.append(["harvest", "--out", str(caches_dir / regime), "--regime", regime, "--docs", "train", *split,
                     "--max-tokens", str(d.tokens), *common])
    return cmds


def _commands(d: DemoConfig) -> tuple[list[list[str]], dict[str, Path], Path]:
    """The harvest and train command lines of the study, the run folders and the evaluation cache."""
    caches = {regime: d.out / "caches" / regime for regime in ("fast", "bt-f", "bt-p")}
    eval_cache = d.out / "caches" / "fast-eval"
    cmds = harvest_commands(d, d.out / "caches")
    runs = {regime: d.out / "runs" / regime for regime in caches}
    norm = ["--normalize", "none"] if d.normalize == "none" else \
        ["--normalize", d.normalize, "--normalize-from", str(caches["fast"])]
    for regime, cache in caches.items():
        cmds.append(["train", str(cache), "--out", str(runs[regime]), "--layers", str(d.layer),
                     "--architectures", _csv(d.architectures), "--expansion-factors", str(d.expansion_factor),
                     "--l1-coefficients", _csv(d.l1_coefficients), "--l0-coefficients", _csv(d.l0_coefficients),
                     "--k", _csv(d.k), "--tokens", str(d.train_tokens), "--batch-tokens", str(d.batch_tokens),
                     "--lr", f"{d.lr:g}", "--lr-end", f"{d.lr / 10:g}", "--buffer-tokens", "32768",
                     "--log-every", "10", "--eval-sequences", "0", *norm])
    return cmds, runs, eval_cache


@click.command()
@click_options(DemoConfig)
def demo_cmd(**params: Any) -> None:
    """Run harvest -> train -> evaluate -> compare for FAST, BT(F) and BT(P) on the embedded default."""
    d = from_options(DemoConfig, params)
    t0 = time.perf_counter()
    cmds, runs, eval_cache = _commands(d)
    times: dict[str, float] = {}
    for args in cmds:
        t = time.perf_counter()
        _run(args)
        times[args[0]] = times.get(args[0], 0.0) + time.perf_counter() - t
    n_held, found = check_held_out(eval_cache, [d.out / "caches" / r for r in ("fast", "bt-f", "bt-p")])
    click.secho(f"\nheld-out check: none of the {n_held} held-out conversations is in a training cache of the "
                f"same dataset ({', '.join(found)})", bold=True)
    evaluation = d.out / "eval"
    args = ["evaluate", *[a for r in runs.values() for a in ("--sae", str(r))], "--eval-cache", str(eval_cache),
            "--out", str(evaluation), "--downstream-sequences", str(d.downstream_sequences),
            "--max-eval-tokens", "0", "--n-features", str(d.n_features)]
    args += (["--interpret"] + ([] if d.judge else ["--no-judge"])) if d.interpret else []
    t = time.perf_counter()
    _run(args)
    times["evaluate"] = time.perf_counter() - t
    _run(["compare", str(evaluation), "--out", str(d.out / "compare")])
    total = time.perf_counter() - t0
    click.secho("\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s",
                bold=True)
    click.secho(f"demo finished: caches in {d.out / 'caches'}, SAEs in {d.out / 'runs'}, report "
                f"{evaluation / 'report.md'}, matched-L0 comparison and frontier plots in {d.out / 'compare'}",
                bold=True)
    click.echo(CONVERGED_NOTE)
