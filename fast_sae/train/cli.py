"""``pipeline.py train``: train a grid of SAEs from an activation cache in one pass.

The options are generated from ``TrainConfig`` and ``GridConfig`` (fast_sae.options), in override
mode: a value given on the command line wins over the run file's (``--config``), which wins over the
dataclass default. Every failure the user can cause (missing cache, layer not cached, d_model
mismatch with an existing run folder, a grid that cannot fit, a corrupt chunk, a bad config) ends
as one ``Error: ...`` line and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from fast_sae.actcache import CacheError, StorageConfig, set_default_storage_options
from fast_sae.options import click_options, from_options, option_values
from fast_sae.saeio import CheckpointError

from .config import ConfigError, GridConfig, TrainConfig, build_config, load_config_file
from .trainer import RunError, Trainer


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=click.Path(path_type=Path), metavar="CACHE")
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path),
              help="Run folder: one SAE folder per grid entry, metrics.jsonl, checkpoints. Rerun to resume.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML/YAML/JSON run file with [train] and [grid] sections; command-line values override it.")
@click_options(GridConfig, overrides=True)
@click_options(TrainConfig, overrides=True)
@click_options(StorageConfig)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--stop-after-steps", type=int, hidden=True,
              help="Checkpoint and stop after this many steps (to test resuming).")
def train_cmd(cache: Path, out: Path, config_file: Path | None, progress: bool, stop_after_steps: int | None,
              **params: Any) -> None:
    """Train a grid of sparse autoencoders on CACHE in one pass over the data.

    Example: pipeline.py train cache/ --out runs/a --layers 2,5 --architectures standard,topk
    --expansion-factors 8,16 --l1-coefficients 5 --k 32,64 --tokens 2000000 --eval-sequences 200
    """
    from fast_sae.actcache import ActivationCache

    try:
        set_default_storage_options(from_options(StorageConfig, params).options())  # never stored in the run
        doc = load_config_file(config_file) if config_file else {}
        grid_over = option_values(GridConfig, params)
        train_over = option_values(TrainConfig, params)
        device = train_over.get("device") or (doc.get("train") or {}).get("device") or "auto"
        if device in ("auto", "cuda") and "LOCAL_RANK" in os.environ:
            import torch

            if torch.cuda.is_available():  # torchrun: one GPU per process
                train_over["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        cache_layers = ActivationCache.open(cache).meta.layers
        cfg, grid = build_config(doc, train_over, grid_over, cache_layers, where=str(config_file or "options"))
        trainer = Trainer(cache, out, cfg, grid, echo=click.echo, progress=progress)
        result = trainer.run(stop_after_steps=stop_after_steps)
    except (CacheError, ConfigError, RunError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.status == "stopped":
        click.echo(f"stopped after step {result.step}; rerun the same command to resume")
