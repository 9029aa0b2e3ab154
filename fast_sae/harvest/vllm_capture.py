"""Residual-stream capture inside a vLLM worker (the ``worker_extension_cls`` of the vLLM engine).

vLLM imports this class by its qualified name inside its worker and mixes it into the worker, so
its methods run next to the model and are called from the engine through ``collective_rpc``. It
must stay importable without vLLM's engine side and must not import the rest of the package.

How the capture works (vLLM V1 model runner, Llama-style decoder layers):
- vLLM's decoder layer ``forward(positions, hidden, residual)`` returns ``(hidden, residual)`` and
  fuses the residual add into the *next* layer's norm, so the residual stream after block L (what
  the cache stores: transformers' ``hidden_states[L + 1]``) is ``hidden + residual`` of block L's
  output. A forward hook on block L computes that sum (in float32, so a bf16 model does not round
  it twice).
- A step's tokens are the scheduled pieces of several requests laid end to end; the runner's own
  layout for the step (``input_batch.req_ids`` and ``query_start_loc``) says which rows belong to
  which request, and the ``positions`` the layer received say where in its prompt each piece
  starts. That stays right under continuous batching and chunked prefill (a long prompt arrives
  in several pieces over several steps); the engine reassembles pieces by position.
- Captured rows are returned as bytes plus the layout, not as tensors: ``collective_rpc`` results
  may cross a process boundary, where tensors are not serialised as data.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class CaptureError(RuntimeError):
    """The model's decoder layers do not look like vLLM's Llama-style (hidden, residual) layers."""


def _find_layers(model: Any, n_layers: int) -> torch.nn.ModuleList:
    """The decoder blocks of a vLLM model: ``model.model.layers`` for Llama/Qwen/Mistral."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers:
        return layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise CaptureError(f"{type(model).__name__}: cannot find its {n_layers} decoder layers")


class ResidualCapture:
    """Mixed into the vLLM worker: forward hooks on the requested blocks, drained after each step."""

    model_runner: Any  # provided by the worker this class is mixed into

    def fast_sae_install(self, layers: list[int], n_layers: int, store_dtype: str) -> None:
        """Hook blocks ``layers`` of the runner's model (``n_layers`` blocks), casting rows to ``store_dtype``."""
        self.fast_sae_remove()
        runner = self.model_runner
        if not (hasattr(runner, "input_batch") and hasattr(runner, "query_start_loc")):
            raise CaptureError(f"{type(runner).__name__}: not vLLM's V1 model runner, whose batch layout the "
                               f"capture reads (set VLLM_USE_V2_MODEL_RUNNER=0)")
        model = runner.get_model()
        blocks = _find_layers(model, n_layers)
        self._fs_layers = sorted(layers)
        self._fs_dtype = _TORCH_DTYPES[store_dtype]
        self._fs_records: list[dict[str, Any]] = []
        self._fs_hooks = [blocks[layer].register_forward_hook(self._fs_hook(layer), with_kwargs=True)
                          for layer in self._fs_layers]

    def fast_sae_remove(self) -> None:
        for h in getattr(self, "_fs_hooks", []):
            h.remove()
        self._fs_hooks = []

    def _fs_hook(self, layer: int) -> Any:
        first = layer == self._fs_layers[0]

        def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 2
                    and all(isinstance(t, torch.Tensor) for t in output)):
                raise CaptureError(f"decoder layer {layer} returned {type(output).__name__}, expected the "
                                   f"(hidden, residual) pair of a Llama-style vLLM layer")
            if first:
                self._fs_records.append(self._fs_layout(args, kwargs))
            record = self._fs_records[-1]
            n = record["n_tokens"]
            hidden, residual = output
            rows = hidden[:n].to(torch.float32) + residual[:n].to(torch.float32)
            record["acts"][str(layer)] = rows.to(self._fs_dtype).cpu().numpy().tobytes()

        return hook

    def _fs_layout(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Which rows of this step belong to which request, and at which prompt position each starts."""
        runner = self.model_runner
        n_reqs = int(runner.input_batch.num_reqs)
        qsl = np.asarray(runner.query_start_loc.np[: n_reqs + 1], dtype=np.int64).copy()
        positions = args[0] if args else kwargs["positions"]
        # a request with no rows this step would index one past the end: clamp (its length is 0 anyway)
        first_rows = torch.as_tensor(np.minimum(qsl[:-1], max(int(qsl[-1]) - 1, 0)))
        starts = positions[first_rows].cpu().numpy().astype(np.int64) if n_reqs else np.zeros(0, np.int64)
        return {"req_ids": list(runner.input_batch.req_ids[:n_reqs]), "query_start_loc": qsl.tolist(),
                "positions": starts.tolist(), "n_tokens": int(qsl[-1]), "acts": {}}

    def fast_sae_take(self) -> list[dict[str, Any]]:
        """The records captured since the last call (one per forward step), and forget them."""
        out, self._fs_records = self._fs_records, []
        return out
