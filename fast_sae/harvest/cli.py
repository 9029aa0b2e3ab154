"""`pipeline.py harvest` and `pipeline.py info`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from fast_sae.actcache import ActivationCache, CacheError, StorageConfig
from fast_sae.lm import ModelLoadError
from fast_sae.options import click_options, from_options

from .data import DataError
from .engine import EngineError
from .render import TemplateError
from .run import HarvestConfig
from .streams import StreamError
from .vllm_venv import SUMMARY_ENV

_USER_ERRORS = (CacheError, DataError, EngineError, ModelLoadError, TemplateError, StreamError, ValueError)


@click.command()
@click_options(HarvestConfig)
def harvest_cmd(**params: Any) -> None:
    """Run the model over a dataset and write residual activations to a zarr cache (resumable)."""
    from .run import run_harvest

    cfg = from_options(HarvestConfig, params)
    if cfg.chunk_tokens <= 0 or cfg.context_size <= 0:
        raise click.UsageError("--chunk-tokens and --context-size must be positive")
    if not cfg.layers:
        raise click.UsageError("--layers: give at least one layer")
    try:
        summary = run_harvest(cfg)
    except _USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    summary_file = os.environ.pop(SUMMARY_ENV, None)  # set when this harvest runs for another Python
    if summary_file:
        Path(summary_file).write_text(json.dumps(summary))
    else:
        click.echo(json.dumps(summary, indent=2))


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--verify", is_flag=True, help="Read every chunk and check its size, checksum, decoding and "
                                             "finiteness (reads the whole cache).")
@click_options(StorageConfig)
def info_cmd(cache: Path, as_json: bool, verify: bool, **params: Any) -> None:
    """Print a readable summary of a cache (complete or not); CACHE is a folder or a URL."""
    try:
        storage = from_options(StorageConfig, params)
        c = ActivationCache.open(cache, require_complete=False, options=storage.options())
        s = c.summary()
        if verify:
            from tqdm import tqdm

            total = len(c.layers) * c.n_chunks
            with tqdm(total=total, unit="chunk", desc="verify", disable=as_json) as bar:
                s["verified_files"] = c.verify_all(progress=bar.update)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    status = "complete" if s["complete"] else f"INCOMPLETE ({s['progress']})"
    fp = s["dataset_fingerprint"] or ""
    lines = [
        f"cache        {s['path']}  [{status}]  format {s['format_version']}",
        f"model        {s['model']}",
        f"regime       {s['regime']}  (context {s['context_size']})",
        f"dataset      {s['dataset']}  sha256 {fp[:12]}",
        f"tokens       {s['n_tokens']:,} in {s['n_sequences']:,} sequences",
        f"layers       {s['layers']}  d_model {s['d_model']}  {s['dtype']}  compression {s['compression']}",
        f"chunks       {s['chunk_tokens']} tokens;  {s['bytes_on_disk'] / 2**20:.1f} MiB stored",
        "roles        " + ", ".join(f"{k} {v:,}" for k, v in s["roles"].items()),
    ]
    for layer, st in (s["stats"] or {}).items():
        lines.append(f"layer {layer:<6} E|x|^2 {st['mean_sq_norm']:.2f}  content-only "
                     f"{st['mean_sq_norm_content'] or 0:.2f}  median |x| {st['median_norm']:.2f}  "
                     f"max |x| {st['max_norm']:.1f}")
    if verify:
        lines.append(f"verified     {s['verified_files']} files: sizes, checksums, decoding and finiteness all good")
    click.echo("\n".join(lines))
