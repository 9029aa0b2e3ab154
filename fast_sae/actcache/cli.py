"""`pipeline.py cache ...`: operations on whole caches (copy between a local folder and an object store)."""
from __future__ import annotations

from typing import Any

import click

from fast_sae.options import click_options, from_options
from fast_sae.redact import redact_text

from .layout import CacheError
from .store import StorageConfig


@click.group(short_help="Operations on whole caches (copy).")
def cache_group() -> None:
    """Operations on whole activation caches; a cache is a folder or a URL (s3://bucket/prefix, ...)."""


@cache_group.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click_options(StorageConfig)
def copy_cmd(src: str, dst: str, progress: bool, **params: Any) -> None:
    """Copy the complete cache SRC to DST (local <-> object store, either direction).

    Resumable: rerun the same command after an interruption; files already at DST are kept when their
    size and checksum match. Every chunk is checked against its recorded size and checksum on the way;
    an incomplete source is refused; DST becomes a cache only when the copy is complete. DST must be new,
    empty, or an earlier (complete or interrupted) copy of SRC, and not inside SRC."""
    from tqdm import tqdm

    from .copy import copy_cache
    from .store import open_store

    try:
        options = from_options(StorageConfig, params).options()
        total = sum(open_store(src, options).list().values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="copy", disable=not progress) as bar:
            result = copy_cache(src, dst, options=options, progress=bar.update)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from None
    shown_src, shown_dst = redact_text(src), redact_text(dst)  # a URL's credentials are never printed
    click.echo(f"{shown_dst}: complete copy of {shown_src} ({result.files} files; {result.copied} copied, "
               f"{result.kept} already there and verified; {result.bytes_copied / 2**20:.1f} MiB transferred)")
