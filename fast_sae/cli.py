"""The command line (`pipeline.py` and the `fast-sae` script): harvest -> train -> evaluate, each stage a
subcommand (see README.md).

Subcommands are imported only when invoked, so `harvest` never imports the training or evaluation
code (and `--help` stays fast).
"""
from __future__ import annotations

import importlib

import click

from fast_sae.redact import redact_text

_COMMANDS = {
    "harvest": ("fast_sae.harvest.cli", "harvest_cmd"),
    "info": ("fast_sae.harvest.cli", "info_cmd"),
    "cache": ("fast_sae.actcache.cli", "cache_group"),
    "train": ("fast_sae.train.cli", "train_cmd"),
    "evaluate": ("fast_sae.evaluate.cli", "evaluate_cmd"),
    "compare": ("fast_sae.evaluate.cli", "compare_cmd"),
    "demo": ("fast_sae.demo", "demo_cmd"),
    "converge": ("fast_sae.converge.cli", "converge_cmd"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> object:
        """Every subcommand's one-line error passes through the redaction helper on its way out (a
        message a store library formats may repeat an endpoint URL or an option value)."""
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            setattr(exc, "message", redact_text(exc.message))  # noqa: B010 (click marks it final)
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """FAST: sparse autoencoders for instruct models, trained from a disk activation cache."""

