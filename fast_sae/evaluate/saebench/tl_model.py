"""TransformerLens on a local model folder, and the layer cut-off, patched at run time in this process only.

Why: SAEBench loads its model with ``HookedTransformer.from_pretrained(_no_processing)(name)``, which
first asks ``get_official_model_name(name)`` and rejects anything outside TransformerLens's list,
although the loaders after it (config, weights, tokenizer) accept a Hugging Face folder. The
embedded model (SmolLM2-135M-Instruct, a Llama) has no entry, so ``local_folders`` lets that one
name check pass a folder holding a config.json through unchanged; every other name goes to the
original check. Nothing installed is edited: the patch lives while the context is open.

``stop_after_hooks``: SAEBench's absorption eval reads one hook (``blocks.L.hook_resid_post``)
through ``run_with_cache(prompts, names_filter=[hook])`` yet runs the whole model and its unembedding
(49k words here) each batch; TransformerLens's own ``stop_at_layer`` makes the forward end after
the last block a cache-only call asks for. Only calls that name their hooks in a list and ask no
``stop_at_layer`` themselves are cut, and only their (unused) output changes: logits become the
residual stream. Calls that need logits (core's CE/KL) go through ``run_with_hooks`` or ``forward``.

Runs inside the SAEBench venv (imports transformer_lens); nothing else of fast_sae is imported.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


def is_model_folder(name: str) -> bool:
    """A Hugging Face model folder (what TransformerLens's config loader reads when given a path)."""
    return (Path(name) / "config.json").is_file()


@contextlib.contextmanager
def local_folders() -> Iterator[None]:
    """Let ``transformer_lens`` load a local model folder by its path (see the module docstring)."""
    from transformer_lens import loading_from_pretrained as loading

    original = loading.get_official_model_name

    def official_or_folder(model_name: str) -> str:
        return model_name if is_model_folder(model_name) else original(model_name)

    loading.get_official_model_name = official_or_folder
    try:
        yield
    finally:
        loading.get_official_model_name = original


def last_block(names: Any) -> int | None:
    """The last block a list of hook names reads, -1 if none is inside a block; None if the names are not a
    plain list of hooks this rule understands (then nothing is cut)."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        return None
    last = -1
    for name in names:
        if not isinstance(name, str):
            return None
        m = _BLOCK.match(name)
        if m:
            last = max(last, int(m.group(1)))
        elif name not in _BEFORE_BLOCKS:
            return None
    return last


@contextlib.contextmanager
def stop_after_hooks() -> Iterator[list[int]]:
    """Cut cache-only forwards after the last block they read (see the module docstring); yields a list
    that collects the block count of every cut call (how often the rule applied)."""
    from transformer_lens import HookedTransformer

    original = HookedTransformer.run_with_cache
    cut: list[int] = []

    def run_with_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("stop_at_layer") is None:
            last = last_block(kwargs.get("names_filter"))
            if last is not None and last + 1 < self.cfg.n_layers:
                kwargs["stop_at_layer"] = last + 1
                cut.append(last + 1)
        return original(self, *args, **kwargs)

    HookedTransformer.run_with_cache = run_with_cache  # type: ignore[method-assign]
    try:
        yield cut
    finally:
        HookedTransformer.run_with_cache = original  # type: ignore[method-assign]
