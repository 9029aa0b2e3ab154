"""`pipeline.py demo`: the whole study on the embedded default, FAST against BT(F) and BT(P).

It only chains the public commands, printing each as a command line a user could type: three
harvests (one per regime, same model, layer and token budget), one training grid per cache, one
evaluation of every SAE on the same held-out FAST chat tokens (the paper's comparison), and the
side-by-side table. Rerunning it resumes or skips what is already done.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import click


def _run(args: list[str]) -> None:
    from fast_sae.cli import cli

    click.secho("\n$ python3 pipeline.py " + " ".join(shlex.quote(a) for a in args), bold=True)
    cli.main(args=args, prog_name="pipeline.py", standalone_mode=False)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--tokens", type=int, default=40_000, show_default=True, help="Tokens harvested per regime.")
@click.option("--layer", type=int, default=15, show_default=True, help="Decoder block (SmolLM2 has 30).")
@click.option("--context-size", type=int, default=512, show_default=True)
@click.option("--architectures", default="standard,jumprelu,topk,batchtopk", show_default=True)
@click.option("--expansion-factor", type=int, default=4, show_default=True)
@click.option("--train-tokens", type=int, default=160_000, show_default=True,
              help="Training tokens per SAE (several passes over a small cache).")
@click.option("--eval-sequences", type=int, default=120, show_default=True,
              help="FAST conversations held out for evaluation.")
@click.option("--judge/--no-judge", default=True, show_default=True,
              help="Score features with the local judge (the embedded model; slow on a CPU).")
@click.option("--n-features", type=int, default=8, show_default=True, help="Features per SAE sent to the judge.")
def demo_cmd(out: Path, tokens: int, layer: int, context_size: int, architectures: str, expansion_factor: int,
             train_tokens: int, eval_sequences: int, judge: bool, n_features: int) -> None:
    """Run harvest -> train -> evaluate -> compare for FAST, BT(F) and BT(P) on the embedded default."""
    t0 = time.perf_counter()
    caches = {regime: out / "caches" / regime for regime in ("fast", "bt-f", "bt-p")}
    runs = {regime: out / "runs" / regime for regime in caches}
    for regime, cache in caches.items():
        _run(["harvest", "--out", str(cache), "--regime", regime, "--layers", str(layer),
              "--max-tokens", str(tokens), "--context-size", str(context_size)])
    for regime, cache in caches.items():
        _run(["train", str(cache), "--out", str(runs[regime]), "--layers", str(layer),
              "--architectures", architectures, "--expansion-factors", str(expansion_factor),
              "--tokens", str(train_tokens), "--batch-size", "1024", "--lr", "5e-4", "--lr-end", "5e-5",
              "--buffer-tokens", "32768", "--log-every", "20",
              "--eval-sequences", str(eval_sequences if regime == "fast" else 0)])
    evaluation = out / "eval"
    args = ["evaluate", *[a for r in runs.values() for a in ("--sae", str(r))], "--eval-cache", str(caches["fast"]),
            "--out", str(evaluation), "--downstream-sequences", "8", "--interpret", "--n-features", str(n_features)]
    _run(args + ([] if judge else ["--no-judge"]))
    _run(["compare", str(evaluation), "--out", str(out / "compare")])
    click.secho(f"\ndemo finished in {time.perf_counter() - t0:.0f} s: caches in {out / 'caches'}, SAEs in "
                f"{out / 'runs'}, report {evaluation / 'report.md'}, comparison {out / 'compare'}", bold=True)
