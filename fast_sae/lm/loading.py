"""Loading an instruct model and its tokenizer: any hub id, local folder, or the embedded default."""
from __future__ import annotations

from typing import Any

import torch

from .embedded import EMBEDDED_MODEL, embedded_model_dir
from .errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(model_id: str) -> str:
    """Turn a model id into what ``from_pretrained`` takes: the embedded folder, a local folder or a hub id."""
    if model_id == EMBEDDED_MODEL or model_id.lower() == "embedded":
        return str(embedded_model_dir())
    if model_id.startswith("embedded:"):
        raise ModelLoadError(f"model {model_id!r}: the only embedded model is {EMBEDDED_MODEL!r}")
    return model_id


def load_tokenizer(model_id: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    source = resolve(model_id)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {model_id!r}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None


def load_model(model_id: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu") -> Any:
    """A causal LM in eval mode, on ``device``, in ``dtype``; sdpa attention so 4D masks work."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    source = resolve(model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=DTYPES[dtype],
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {model_id!r}: cannot load ({str(exc).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model.to(device)  # type: ignore[arg-type]  # transformers' stubs miss the str overload
