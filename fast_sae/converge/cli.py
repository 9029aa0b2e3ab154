"""`pipeline.py converge`: run (or continue) the convergence study, then write its report."""
from __future__ import annotations

import json
import re
from typing import Any

import click

from fast_sae.options import click_options, from_options

from .aggregate import markdown, plot_gap_vs_tokens, plot_gaps, summarize
from .plan import ConvergeConfig, execute, plan_runs


def write_report(c: ConvergeConfig, runs: list[Any]) -> str:
    """converge.json, converge.md and the plots from whatever evaluations exist; returns the markdown."""
    summary, table = summarize(c, runs)
    plots = plot_gaps(summary, c.out) + plot_gap_vs_tokens(table, c.out)
    sweeps = c.out / "sweeps_compare" / "compare.md"
    # compare.md's own title dropped and its plots linked from here
    sweeps_md = re.sub(r"\]\((?!http)([^)]+\.png)\)", r"](sweeps_compare/\1)", sweeps.read_text()).replace(
        "# FAST vs BT(F) vs BT(P)\n", "", 1) if sweeps.is_file() else None
    md = markdown(c, summary, table, plots, sweeps_md)
    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "converge.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str))
    (c.out / "converge.md").write_text(md)
    return md


@click.command()
@click_options(ConvergeConfig)
@click.option("--report-only", is_flag=True, help="Only rewrite the report from the evaluations done so far.")
def converge_cmd(report_only: bool, **params: Any) -> None:
    """FAST vs BT(F) vs BT(P) trained to convergence: TopK/BatchTopK cells with seeds over a ladder of
    training lengths, Standard/JumpReLU sweeps, every SAE scored on three held-out formats and on its
    own training documents. Resumable: rerun the same command to continue; --time-limit-minutes runs it
    in parts."""
    c = from_options(ConvergeConfig, params)
    if report_only:
        from fast_sae.actcache import ActivationCache

        runs = plan_runs(c, ActivationCache.open(c.caches / "fast").meta.d_model)
        stopped = False
    else:
        result = execute(c)
        runs, stopped = result["runs"], result["stopped"]
    md = write_report(c, runs)
    click.echo(md)
    done = sum((r.folder / "summary.json").is_file() for r in runs)
    click.secho(f"\nconverge: {done} of {len(runs)} training runs finished; report {c.out / 'converge.md'}"
                + ("; stopped at the time limit: rerun the same command to continue" if stopped else ""), bold=True)
