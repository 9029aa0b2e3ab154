"""`pipeline.py evaluate` and `pipeline.py compare`.

Why thin: flags become dataclass configs for ``runner.run_evaluation`` / ``compare.run_compare``;
every input error known to the stages (bad SAE folder, cache/layer/d_model mismatch, model load,
judge backend) becomes one ``Error: ...`` line and exit status 1, never a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fast_sae.actcache import StorageConfig, set_default_storage_options
from fast_sae.options import click_options, from_options
from fast_sae.redact import redact_text

from .config import EvalConfig
from .errors import EvalError


def _user_errors() -> tuple[type[BaseException], ...]:
    from fast_sae.actcache import CacheError
    from fast_sae.lm import ModelLoadError
    from fast_sae.saeio import CheckpointError

    errors: list[type[BaseException]] = [EvalError, CacheError, CheckpointError, ModelLoadError]
    try:
        from .interpret import BackendError, JudgeParseError

        errors += [BackendError, JudgeParseError]
    except ImportError:
        pass
    return tuple(errors)


@click.command(short_help="Score SAEs: reconstruction, downstream loss, interpretability, intervention.")
@click.option("--sae", "saes", multiple=True, required=True, type=click.Path(path_type=Path),
              help="SAE checkpoint folder (ours or SAELens'), a run folder whose subfolders are checkpoints, or "
                   "sae_lens:RELEASE:SAE_ID (a pretrained SAELens release; needs sae-lens and the hub). Repeatable.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="The cache the SAEs were trained on; scored on its held-out sequences (cfg eval_sequences) "
                   "unless --eval-cache is given.")
@click.option("--eval-cache", "eval_caches", multiple=True, type=click.Path(path_type=Path),
              help="Score on this cache instead (e.g. BT(P) SAEs on FAST chat tokens: the paper's main "
                   "comparison). Repeatable: every SAE is scored on every eval cache.")
@click_options(EvalConfig)
@click_options(StorageConfig)
def evaluate_cmd(saes: tuple[Path, ...], cache: Path | None, eval_caches: tuple[Path, ...], **params: Any) -> None:
    """Score SAEs: reconstruction (paper eq. 7 MSE, MSE_st, FVE, L0, dead/dense, by token role), downstream
    LM loss with the SAE spliced in, and optionally interpretability and the special-token intervention.
    Writes OUT/report.json, OUT/report.md and OUT/plots/*.png, and prints the table."""
    from .runner import run_evaluation, summary_table

    try:
        set_default_storage_options(from_options(StorageConfig, params).options())  # for s3://... caches
        caches = list(eval_caches) or ([cache] if cache is not None else [])
        if not caches:
            raise EvalError("no cache: pass --cache (the training cache) and/or --eval-cache")
        if cache is not None and eval_caches:
            from fast_sae.actcache import ActivationCache

            ActivationCache.open(cache)  # must at least be a readable cache (it names the training data)
        cfg = from_options(EvalConfig, params, saes=list(saes), caches=caches)
        report = run_evaluation(cfg, log=lambda msg: click.echo(redact_text(msg), err=True))
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n" + summary_table(report) + "\n")
    for w in report["warnings"]:
        click.echo(redact_text(f"warning: {w}"), err=True)
    click.echo(f"{len(report['rows'])} SAE evaluation(s) in {report['seconds']:.1f} s -> {cfg.out / 'report.json'}, "
               f"{cfg.out / 'report.md'}, {len(report['plots'])} plot(s) in {cfg.out / 'plots'}")


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Write compare.json, compare.md and compare_*.png here (else only print).")
def compare_cmd(reports: tuple[Path, ...], out: Path | None) -> None:
    """Put FAST, BT(F) and BT(P) side by side from evaluation folders (or report.json files) written by
    `pipeline.py evaluate`; one table per model/layer/architecture/width/eval data."""
    from .compare import run_compare

    try:
        groups, md, files = run_compare(list(reports), out)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(md)
    if files:
        click.echo(f"{len(groups)} group(s) -> " + ", ".join(files.values()))
