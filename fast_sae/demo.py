"""`pipeline.py demo`: the whole study on the embedded default, FAST against BT(F) and BT(P).

It only chains the public commands, printing each as a command line a user could type: three
harvests (one per regime, same model, layer and token budget), one training grid per cache, one
evaluation of every SAE on the same held-out FAST chat tokens (the paper's comparison), and the
side-by-side table. Rerunning it resumes or skips what is already done.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from fast_sae.options import click_options, from_options, setting


def _run(args: list[str]) -> None:
    from fast_sae.cli import cli

    click.secho("\n$ python3 pipeline.py " + " ".join(shlex.quote(a) for a in args), bold=True)
    cli.main(args=args, prog_name="pipeline.py", standalone_mode=False)


@dataclass
class DemoConfig:
    """The study's sizes; every field is also a `pipeline.py demo` option."""

    out: Path = setting(Path("runs/demo"), help="Folder for caches, runs, evaluation and comparison.")
    tokens: int = setting(40_000, help="Tokens harvested per regime.")
    layer: int = setting(15, help="Decoder block (SmolLM2 has 30).")
    context_size: int = setting(512, help="FAST truncation / BT block length.")
    architectures: list[str] = setting(default_factory=lambda: ["standard", "jumprelu", "topk", "batchtopk"],
                                       help="SAE architectures.")
    expansion_factor: int = setting(4, help="d_sae / d_model.")
    train_tokens: int = setting(160_000, help="Training tokens per SAE (several passes over a small cache).")
    eval_sequences: int = setting(120, help="FAST conversations held out for evaluation.")
    judge: bool = setting(True, help="Score features with the local judge (the embedded model; slow on a CPU).")
    n_features: int = setting(8, help="Features per SAE sent to the judge.")


@click.command()
@click_options(DemoConfig)
def demo_cmd(**params: Any) -> None:
    """Run harvest -> train -> evaluate -> compare for FAST, BT(F) and BT(P) on the embedded default."""
    d = from_options(DemoConfig, params)
    out, tokens, layer, context_size = d.out, d.tokens, d.layer, d.context_size
    architectures, expansion_factor, train_tokens = ",".join(d.architectures), d.expansion_factor, d.train_tokens
    eval_sequences, judge, n_features = d.eval_sequences, d.judge, d.n_features
    t0 = time.perf_counter()
    caches = {regime: out / "caches" / regime for regime in ("fast", "bt-f", "bt-p")}
    runs = {regime: out / "runs" / regime for regime in caches}
    for regime, cache in caches.items():
        _run(["harvest", "--out", str(cache), "--regime", regime, "--layers", str(layer),
              "--max-tokens", str(tokens), "--context-size", str(context_size)])
    for regime, cache in caches.items():
        _run(["train", str(cache), "--out", str(runs[regime]), "--layers", str(layer),
              "--architectures", architectures, "--expansion-factors", str(expansion_factor),
              "--tokens", str(train_tokens), "--batch-tokens", "1024", "--lr", "5e-4", "--lr-end", "5e-5",
              "--buffer-tokens", "32768", "--log-every", "20",
              "--eval-sequences", str(eval_sequences if regime == "fast" else 0)])
    evaluation = out / "eval"
    args = ["evaluate", *[a for r in runs.values() for a in ("--sae", str(r))], "--eval-cache", str(caches["fast"]),
            "--out", str(evaluation), "--downstream-sequences", "8", "--interpret", "--n-features", str(n_features)]
    _run(args + ([] if judge else ["--no-judge"]))
    _run(["compare", str(evaluation), "--out", str(out / "compare")])
    click.secho(f"\ndemo finished in {time.perf_counter() - t0:.0f} s: caches in {out / 'caches'}, SAEs in "
                f"{out / 'runs'}, report {evaluation / 'report.md'}, comparison {out / 'compare'}", bold=True)
