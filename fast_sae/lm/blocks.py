"""Finding a model's decoder blocks and reading or rewriting their outputs, whatever the architecture.

Harvest captures block outputs, evaluate splices reconstructions into them and steers them; all go
through these helpers so "layer L" means the same block everywhere (the output of decoder block L,
transformers' ``hidden_states[L + 1]``).
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import ModelLoadError


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
