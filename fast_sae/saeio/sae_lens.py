"""SAEs held by the SAELens library: pretrained releases through its own loader.

Why through SAELens: its releases come in many upstream formats (each with a converter in
SAELens); its ``SAE.from_pretrained`` already turns every one into an SAELens 6 SAE object, whose
config and state dict are exactly what ``SAE.save_model`` would write. Those are read here by the
same code that reads a cfg.json, so a pretrained SAE is checked like a folder. sae-lens is optional:
it is imported only when asked for, and its absence or an unreachable hub is one line.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import CheckpointError
from .format import LoadedSAE, sae_from_parts
from .layout import from_cfg_json

SPEC_PREFIX = "sae_lens:"


def is_spec(text: str) -> bool:
    return text.startswith(SPEC_PREFIX)


def parse_spec(text: str) -> tuple[str, str]:
    """``sae_lens:RELEASE:SAE_ID`` -> (RELEASE, SAE_ID).

    A colon separates the two because SAE ids contain slashes (``layer_20/width_16k/canonical``)
    and releases may be Hugging Face repo ids (``org/repo``); neither contains a colon.
    """
    body = text[len(SPEC_PREFIX):]
    release, sep, sae_id = body.partition(":")
    if not sep or not release or not sae_id:
        raise CheckpointError(f"{text}: expected sae_lens:RELEASE:SAE_ID (e.g. "
                              f"sae_lens:gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical)")
    return release, sae_id


def from_sae_lens_object(sae: Any, where: str) -> LoadedSAE:
    """Convert a live ``sae_lens.SAE`` (inference class) the way its ``save_model`` would write it."""
    state = dict(sae.state_dict())
    sae.process_state_dict_for_saving(state)
    try:
        doc = json.loads(json.dumps(sae.cfg.to_dict()))
    except TypeError as exc:
        raise CheckpointError(f"{where}: SAELens config is not JSON ({exc})") from None
    cfg = from_cfg_json(doc, where)
    return sae_from_parts({k: v.detach().cpu() for k, v in state.items()}, cfg, where)


def load_pretrained(spec: str, device: str = "cpu") -> LoadedSAE:
    """Load ``sae_lens:RELEASE:SAE_ID`` with ``sae_lens.SAE.from_pretrained`` (downloads from the hub)."""
    release, sae_id = parse_spec(spec)
    try:
        from sae_lens import SAE
    except ImportError as exc:
        raise CheckpointError(f"{spec}: needs the sae-lens package (pip install 'sae-lens>=6'): {exc}") from None
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # hub, network and SAELens' own lookup errors all end here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{spec}: SAELens could not load it (is the Hugging Face hub reachable?): "
                              f"{type(exc).__name__}: {first}") from None
    return from_sae_lens_object(sae, spec).to(device)
