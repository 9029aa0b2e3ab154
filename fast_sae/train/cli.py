"""``pipeline.py train``: train a grid of SAEs from an activation cache in one pass.

Every failure the user can cause (missing cache, layer not cached, d_model mismatch with an
existing run folder, a grid that cannot fit, a corrupt chunk, a bad config) ends as one
``Error: ...`` line and a non-zero exit, never a traceback.
"""
from __future__ import annotations

from pathlib import Path

import click

from fast_sae.actcache import CacheError
from fast_sae.saeio import CheckpointError

from .config import ARCHITECTURES, DECODER_PATHS, NORMALIZATIONS, ORDERS, ConfigError, build_config, load_config_file
from .trainer import RunError, Trainer


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None


def _floats(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers") from None


def _strs(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Run folder: one SAE folder per grid entry, metrics.jsonl, checkpoints. Rerun to resume.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML/YAML file with [train] and [grid] sections; command-line values override it.")
@click.option("--layers", help="Comma-separated cached layers (default: every cached layer).")
@click.option("--architectures", help=f"Comma-separated, from {', '.join(ARCHITECTURES)} (default: standard).")
@click.option("--expansion-factors", help="Comma-separated d_sae / d_model ratios (default: 8).")
@click.option("--l1-coefficients", help="Standard SAE L1 coefficients (paper: 5).")
@click.option("--l0-coefficients", help="JumpReLU L0 coefficients (paper: 0.01).")
@click.option("--k", "ks", help="k values for topk and batchtopk (default: 32).")
@click.option("--tokens", type=int, help="Training tokens per SAE (paper: 40,960,000).")
@click.option("--batch-size", type=int, help="Tokens per step (default 4096; the paper uses 128).")
@click.option("--lr", type=float, help="Adam learning rate (paper: 7e-5).")
@click.option("--lr-end", type=float, help="Learning rate at the end of the cosine phase (paper: 7e-6).")
@click.option("--seed", type=int, help="Seed for init and data order (paper: 42).")
@click.option("--buffer-tokens", type=int, help="Mixing buffer size in tokens; half is served per refill.")
@click.option("--order", type=click.Choice(ORDERS), help="mixing (FAST, default), sequential, or random.")
@click.option("--eval-sequences", type=int, help="Hold out the cache's last N sequences for evaluation.")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS),
              help="Scale so E||x||^2 = d_model over content tokens (default) or all tokens, or none.")
@click.option("--b-dec-init", type=click.Choice(["geometric_median", "mean", "zeros"]),
              help="Decoder bias init (paper: geometric_median).")
@click.option("--l1-decoder-norm/--no-l1-decoder-norm", default=None,
              help="Standard SAE: decoder-norm-weighted L1 (Anthropic, Apr 2024) instead of unit-norm decoder.")
@click.option("--decoder-path", type=click.Choice(DECODER_PATHS),
              help="TopK/BatchTopK step on the kept entries only (sparse) or dense; auto (default) by k / d_sae.")
@click.option("--log-every", type=int, help="Steps between metrics.jsonl lines.")
@click.option("--checkpoint-every", type=int, help="Steps between resumable checkpoints.")
@click.option("--device", help="cpu or cuda (under torchrun each process uses cuda:LOCAL_RANK).")
@click.option("--max-memory-gb", type=float, help="Memory budget for the fits-check (default: what is free).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--stop-after-steps", type=int, hidden=True,
              help="Checkpoint and stop after this many steps (to test resuming).")
def train_cmd(cache: Path, out: Path, config_file: Path | None, layers: str | None, architectures: str | None,
              expansion_factors: str | None, l1_coefficients: str | None, l0_coefficients: str | None,
              ks: str | None, tokens: int | None, batch_size: int | None, lr: float | None, lr_end: float | None,
              seed: int | None, buffer_tokens: int | None, order: str | None, eval_sequences: int | None,
              normalize: str | None, b_dec_init: str | None, l1_decoder_norm: bool | None,
              decoder_path: str | None, log_every: int | None,
              checkpoint_every: int | None, device: str | None, max_memory_gb: float | None, progress: bool,
              stop_after_steps: int | None) -> None:
    """Train a grid of sparse autoencoders on CACHE in one pass over the data.

    Example: pipeline.py train cache/ --out runs/a --layers 2,5 --architectures standard,topk
    --expansion-factors 8,16 --l1-coefficients 5 --k 32,64 --tokens 2000000 --eval-sequences 200
    """
    import os

    from fast_sae.actcache import ActivationCache

    try:
        doc = load_config_file(config_file) if config_file else {}
        cache_layers = ActivationCache.open(cache).meta.layers
        if device and device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        train_over = {"tokens": tokens, "batch_size": batch_size, "lr": lr, "lr_end": lr_end, "seed": seed,
                      "buffer_tokens": buffer_tokens, "order": order, "eval_sequences": eval_sequences,
                      "normalize": normalize, "b_dec_init": b_dec_init, "l1_decoder_norm": l1_decoder_norm,
                      "decoder_path": decoder_path,
                      "log_every": log_every, "checkpoint_every": checkpoint_every, "device": device,
                      "max_memory_gb": max_memory_gb}
        grid_over = {"layers": _ints(layers), "architectures": _strs(architectures),
                     "expansion_factors": _ints(expansion_factors),
                     "sparsity": {"standard": _floats(l1_coefficients), "jumprelu": _floats(l0_coefficients),
                                  "topk": _floats(ks), "batchtopk": _floats(ks)}}
        cfg, grid = build_config(doc, train_over, grid_over, cache_layers)
        trainer = Trainer(cache, out, cfg, grid, echo=click.echo, progress=progress)
        result = trainer.run(stop_after_steps=stop_after_steps)
    except (CacheError, ConfigError, RunError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.status == "stopped":
        click.echo(f"stopped after step {result.step}; rerun the same command to resume")
