"""Forward engines that return residual activations of chosen layers for a packed batch.

An engine is anything with ``d_model``, ``n_layers`` and ``run(batch, token_ids) -> {layer: array}``
(rows of real tokens in stream order). ``HFEngine`` (transformers) runs on CPU and GPU; a vLLM
engine can be added behind the same interface without touching the writer or the streams.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from fast_sae.lm import block_hidden, decoder_layers, model_info

from .batching import Batch, batch_tensors


class Engine(Protocol):
    d_model: int
    n_layers: int

    def run(self, batch: Batch, token_ids: np.ndarray) -> dict[int, np.ndarray]: ...


class _StopForward(Exception):
    """Raised by the deepest hook: the layers above it are never computed."""


class HFEngine:
    """Captures the output of decoder blocks with forward hooks and stops after the deepest one."""

    def __init__(self, model: Any, layers: list[int], store_dtype: str, pad_id: int) -> None:
        self.model = model
        self.layers = sorted(layers)
        self.d_model, self.n_layers = model_info(model)
        bad = [layer for layer in self.layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist: the model has layers 0..{self.n_layers - 1}")
        self.store_dtype = np.dtype(store_dtype)
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self._captured: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._hooks = [blocks[layer].register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: int) -> Any:
        deepest = layer == self.layers[-1]

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            self._captured[layer] = block_hidden(output)
            if deepest:
                raise _StopForward

        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    @torch.inference_mode()
    def run(self, batch: Batch, token_ids: np.ndarray) -> dict[int, np.ndarray]:
        t = batch_tensors(batch, token_ids, self.pad_id)
        self._captured.clear()
        kwargs: dict[str, Any] = {"input_ids": t.input_ids.to(self.device),
                                  "position_ids": t.position_ids.to(self.device), "use_cache": False}
        if t.attention_mask is not None:
            kwargs["attention_mask"] = t.attention_mask.to(self.device)
        try:
            self.model.model(**kwargs) if hasattr(self.model, "model") else self.model(**kwargs)
        except _StopForward:
            pass
        valid = t.valid.to(self.device)
        out = {}
        for layer in self.layers:
            rows = self._captured[layer][valid]
            out[layer] = rows.to(torch.float32 if self.store_dtype == np.float32 else torch.float16).cpu().numpy()
        return out
