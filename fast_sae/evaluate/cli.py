"""`pipeline.py evaluate` and `pipeline.py compare`.

Why thin: flags become dataclass configs for ``runner.run_evaluation`` / ``compare.run_compare``;
every input error known to the stages (bad SAE folder, cache/layer/d_model mismatch, model load,
judge backend) becomes one ``Error: ...`` line and exit status 1, never a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

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


def _float_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _int_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_prompts(path: Path | None) -> list[str] | None:
    """A JSON list of strings, a JSON object with "prompts", or one prompt per non-empty line."""
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    prompts = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise EvalError(f"{path}: expected a JSON list of strings (or {{\"prompts\": [...]}})")
    return prompts


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
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Folder for report.json, "
              "report.md, plots/ and per-SAE outputs.")
@click.option("--max-eval-tokens", type=int, default=200_000, show_default=True,
              help="Token budget of the reconstruction metrics (whole sequences, in stream order; 0: no cap).")
@click.option("--eval-sequences", default=None, metavar="START:STOP",
              help="Use exactly these sequences of the eval cache (overrides the held-out rule).")
@click.option("--batch-tokens", type=int, default=4096, show_default=True, help="Tokens per SAE forward.")
@click.option("--dead-threshold", type=float, default=0.0, show_default=True,
              help="A feature is dead if it fires on at most this share of eval tokens.")
@click.option("--dense-threshold", type=float, default=0.1, show_default=True,
              help="A feature is dense if it fires on more than this share of eval tokens.")
@click.option("--downstream/--no-downstream", default=True, show_default=True,
              help="Splice each SAE into the model and measure LM loss (needs the model).")
@click.option("--model", default=None, help="Model for downstream/intervention [default: the cache's model_id].")
@click.option("--downstream-sequences", type=int, default=16, show_default=True)
@click.option("--downstream-tokens", type=int, default=2048, show_default=True,
              help="Token budget of the downstream loss (whole sequences; at least one).")
@click.option("--downstream-max-len", type=int, default=None, help="Truncate downstream sequences to this length.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--interpret/--no-interpret", default=False, show_default=True,
              help="Top-activating examples, LLM judge and dashboard per SAE (evaluate.interpret).")
@click.option("--n-features", type=int, default=32, show_default=True, help="Features sampled for the judge.")
@click.option("--top-n", type=int, default=5, show_default=True, help="Top contexts per feature.")
@click.option("--window", type=int, default=8, show_default=True, help="Context tokens either side of the max.")
@click.option("--judge/--no-judge", "use_judge", default=True, show_default=True,
              help="Ask the LLM judge (with --interpret / --intervention); off: examples and dashboard only.")
@click.option("--judge-backend", type=click.Choice(["local", "openai"]), default="local", show_default=True)
@click.option("--judge-model", default=None, help="Judge model [default: the embedded instruct model for local].")
@click.option("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
@click.option("--judge-api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the judge API key.")
@click.option("--judge-cache", type=click.Path(path_type=Path), default=None,
              help="Folder of cached judge replies [default: per SAE under --out].")
@click.option("--intervention/--no-intervention", default=False, show_default=True,
              help="Steer generation with the SAE's special-token features and judge the replies.")
@click.option("--alphas", callback=_float_list, default="0,15,25,50", show_default=True)
@click.option("--steer-features", callback=_int_list, default=None, help="Feature ids [default: discovered].")
@click.option("--steer-n-features", type=int, default=1, show_default=True)
@click.option("--steer-positions", type=click.Choice(["all", "special"]), default="all", show_default=True)
@click.option("--steer-mode", type=click.Choice(["add", "scale"]), default="add", show_default=True)
@click.option("--steer-max-new-tokens", type=int, default=48, show_default=True)
@click.option("--prompts-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Intervention prompts: a JSON list or one per line [default: the shipped prompts].")
@click.option("--plots/--no-plots", default=True, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def evaluate_cmd(saes: tuple[Path, ...], cache: Path | None, eval_caches: tuple[Path, ...], out: Path,
                 **kw: Any) -> None:
    """Score SAEs: reconstruction (paper eq. 7 MSE, MSE_st, FVE, L0, dead/dense, by token role), downstream
    LM loss with the SAE spliced in, and optionally interpretability and the special-token intervention.
    Writes OUT/report.json, OUT/report.md and OUT/plots/*.png, and prints the table."""
    try:
        report = _evaluate(saes, cache, eval_caches, out, kw)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    from .runner import summary_table

    click.echo("\n" + summary_table(report) + "\n")
    for w in report["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{len(report['rows'])} SAE evaluation(s) in {report['seconds']:.1f} s -> {out / 'report.json'}, "
               f"{out / 'report.md'}, {len(report['plots'])} plot(s) in {out / 'plots'}")


def _evaluate(saes: tuple[Path, ...], cache: Path | None, eval_caches: tuple[Path, ...], out: Path,
              kw: dict[str, Any]) -> dict[str, Any]:
    from .downstream import DownstreamConfig
    from .reconstruction import ReconstructionConfig
    from .runner import EvalConfig, InterpretSettings, InterventionSettings, run_evaluation
    from .sources import parse_range

    device = _device(kw["device"])
    caches = list(eval_caches) or ([cache] if cache is not None else [])
    if not caches:
        raise EvalError("no cache: pass --cache (the training cache) and/or --eval-cache")
    if cache is not None and eval_caches:
        from fast_sae.actcache import ActivationCache

        ActivationCache.open(cache)  # must at least be a readable cache (it names the training data)
    judge = None
    if kw["use_judge"] and (kw["interpret"] or kw["intervention"]):
        from fast_sae.lm import EMBEDDED_MODEL

        from .interpret import JudgeConfig

        if kw["judge_backend"] == "openai" and not kw["judge_model"]:
            raise EvalError("--judge-backend openai needs --judge-model (the served model name)")
        judge = JudgeConfig(backend=kw["judge_backend"], model=kw["judge_model"] or EMBEDDED_MODEL,
                            base_url=kw["judge_url"], api_key_env=kw["judge_api_key_env"],
                            cache_dir=kw["judge_cache"], device=device)
    if kw["max_eval_tokens"] is not None and kw["max_eval_tokens"] < 0:
        raise EvalError("--max-eval-tokens must be >= 0 (0: no cap)")
    for name in ("batch_tokens", "downstream_sequences", "downstream_tokens", "n_features", "top_n"):
        if kw[name] is not None and kw[name] < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = EvalConfig(
        saes=list(saes), caches=caches, out=out, max_eval_tokens=kw["max_eval_tokens"] or None,
        eval_sequences=parse_range(kw["eval_sequences"]) if kw["eval_sequences"] else None,
        reconstruction=ReconstructionConfig(batch_tokens=kw["batch_tokens"], dead_threshold=kw["dead_threshold"],
                                            dense_threshold=kw["dense_threshold"], device=device,
                                            progress=kw["progress"]),
        downstream=DownstreamConfig(max_sequences=kw["downstream_sequences"], max_tokens=kw["downstream_tokens"],
                                    max_seq_len=kw["downstream_max_len"], device=device, progress=kw["progress"])
        if kw["downstream"] else None,
        model=kw["model"],
        interpret=InterpretSettings(n_features=kw["n_features"], top_n=kw["top_n"], window=kw["window"],
                                    judge=judge) if kw["interpret"] else None,
        intervention=InterventionSettings(alphas=kw["alphas"], n_features=kw["steer_n_features"],
                                          features=kw["steer_features"], positions=kw["steer_positions"],
                                          mode=kw["steer_mode"], max_new_tokens=kw["steer_max_new_tokens"],
                                          prompts=_read_prompts(kw["prompts_file"]), judge=judge)
        if kw["intervention"] else None,
        device=device, plots=kw["plots"])
    return run_evaluation(cfg, log=lambda msg: click.echo(msg, err=True))


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
