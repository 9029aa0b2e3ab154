"""The command line: harvest -> train -> evaluate, each stage a subcommand (see README.md)."""
from __future__ import annotations

import click

from evaluate.cli import compare_cmd, evaluate_cmd
from harvest.cli import harvest_cmd, info_cmd
from train.cli import train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """FAST: sparse autoencoders for instruct models, trained from a disk activation cache."""


cli.add_command(harvest_cmd, "harvest")
cli.add_command(info_cmd, "info")
cli.add_command(train_cmd, "train")
cli.add_command(evaluate_cmd, "evaluate")
cli.add_command(compare_cmd, "compare")

if __name__ == "__main__":
    cli()
