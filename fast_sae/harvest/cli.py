"""`pipeline.py harvest` and `pipeline.py info`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from fast_sae.actcache import REGIMES, ActivationCache, CacheError
from fast_sae.lm import EMBEDDED_MODEL, ModelLoadError

from .data import DataError
from .engine import BACKENDS, EngineError
from .render import TemplateError
from .streams import SEPARATORS, StreamError

_USER_ERRORS = (CacheError, DataError, EngineError, ModelLoadError, TemplateError, StreamError, ValueError)


def _int_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer numbers, got {value!r}") from None


@click.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Cache folder to write (or resume).")
@click.option("--model", default=EMBEDDED_MODEL, show_default=True, help="Hub id, local folder, or the embedded default.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--regime", type=click.Choice(REGIMES), default="fast", show_default=True,
              help="fast: one templated conversation per sequence; bt-f: templated chats packed into blocks; "
                   "bt-p: plain text packed into blocks.")
@click.option("--dataset", default=None, help="HF dataset name or local json/jsonl/parquet/csv path "
              "[default: embedded:chatterbot-en, or embedded:python-docs for bt-p].")
@click.option("--dataset-split", default="train", show_default=True)
@click.option("--dataset-config", default=None)
@click.option("--text-field", default="text", show_default=True, help="Text column for bt-p.")
@click.option("--max-samples", type=int, default=None, help="Read at most this many samples.")
@click.option("--max-tokens", type=int, default=200_000, show_default=True, help="Token budget of the cache.")
@click.option("--context-size", type=int, default=1024, show_default=True,
              help="FAST: truncation length; BT: block length.")
@click.option("--layers", callback=_int_list, default="3,15", show_default=True,
              help="Decoder blocks whose output (resid_post) is stored, 0-indexed.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype of activations.")
@click.option("--model-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", show_default=True)
@click.option("--chunk-tokens", type=int, default=4096, show_default=True, help="Tokens per chunk file.")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True)
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Tokens per forward batch.")
@click.option("--row-tokens", type=int, default=512, show_default=True,
              help="Target length of a packed row of consecutive sequences.")
@click.option("--system-prompt", default=None,
              help="Add this system message to conversations without one (else the template's default applies).")
@click.option("--doc-separator", type=click.Choice(SEPARATORS), default="none", show_default=True,
              help="BT regimes: token inserted before each document.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Forward engine: hf (transformers), vllm (needs vLLM: ./setup_vllm.sh, then run with "
                   ".venv-vllm/bin/python), auto (vllm where installed and the model is supported, else hf).")
@click.option("--vllm-args", default=None,
              help="JSON object of extra vllm.LLM keyword arguments, e.g. '{\"gpu_memory_utilization\": 0.8}'.")
def harvest_cmd(out: Path, **kwargs: object) -> None:
    """Run the model over a dataset and write residual activations to a zarr cache (resumable)."""
    from .run import HarvestConfig, run_harvest

    if int(kwargs["chunk_tokens"]) <= 0 or int(kwargs["context_size"]) <= 0:  # type: ignore[arg-type]
        raise click.UsageError("--chunk-tokens and --context-size must be positive")
    if not kwargs["layers"]:
        raise click.UsageError("--layers: give at least one layer")
    try:
        summary = run_harvest(HarvestConfig(out=out, **kwargs))  # type: ignore[arg-type]
    except _USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=2))


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(cache: Path, as_json: bool) -> None:
    """Print a readable summary of a cache (complete or not)."""
    try:
        s = ActivationCache.open(cache, require_complete=False).summary()
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    status = "complete" if s["complete"] else f"INCOMPLETE ({s['tokens_committed']} of {s['n_tokens']} tokens committed)"
    lines = [
        f"cache        {s['path']}  [{status}]",
        f"model        {s['model']}",
        f"regime       {s['regime']}  (context {s['context_size']})",
        f"dataset      {s['dataset']}  sha256 {s['dataset_fingerprint'][:12]}",
        f"tokens       {s['n_tokens']:,} in {s['n_sequences']:,} sequences",
        f"layers       {s['layers']}  d_model {s['d_model']}  {s['dtype']}  compression {s['compression']}",
        f"chunks       {s['chunk_tokens']} tokens;  {s['bytes_on_disk'] / 2**20:.1f} MiB on disk",
        "roles        " + ", ".join(f"{k} {v:,}" for k, v in s["roles"].items()),
    ]
    for layer, st in (s["stats"] or {}).items():
        lines.append(f"layer {layer:<6} E|x|^2 {st['mean_sq_norm']:.2f}  content-only {st['mean_sq_norm_content'] or 0:.2f}"
                     f"  median |x| {st['median_norm']:.2f}  max |x| {st['max_norm']:.1f}")
    click.echo("\n".join(lines))
