"""Forward engines that return residual activations of chosen layers, and the choice between them.

An engine plans its own work units over the token stream (``plan(seq_starts) -> [Batch]``: each a
contiguous range of whole sequences, a pure function of the stream so a resumed harvest redoes
exactly the units an uninterrupted one did) and runs one (``run(batch, token_ids) -> {layer: rows}``,
rows of real tokens in stream order, ready for the cache writer). ``HFEngine`` (transformers, CPU
or GPU) packs sequences into padded rows; ``VLLMEngine`` (``vllm_engine.py``) hands whole
sequences to vLLM and lets it batch them.
"""
from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fast_sae.lm import block_hidden, decoder_layers, model_info

from .batching import Batch, batch_tensors, plan_batches

if TYPE_CHECKING:
    from .run import HarvestConfig

BACKENDS = ("auto", "hf", "vllm")


class EngineError(Exception):
    """An engine cannot be chosen, built or run as asked; one line saying why and what to do."""


class Engine(Protocol):
    name: str
    d_model: int
    n_layers: int

    def plan(self, seq_starts: np.ndarray) -> list[Batch]: ...

    def run(self, batch: Batch, token_ids: np.ndarray) -> dict[int, np.ndarray]: ...

    def close(self) -> None: ...


class _StopForward(Exception):
    """Raised by the deepest hook: the layers above it are never computed."""


class HFEngine:
    """Captures the output of decoder blocks with forward hooks and stops after the deepest one."""

    name = "hf"

    def __init__(self, model: Any, layers: list[int], store_dtype: str, pad_id: int, row_tokens: int = 512,
                 batch_tokens: int = 8192) -> None:
        self.model = model
        self.row_tokens, self.batch_tokens = row_tokens, batch_tokens
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

    def plan(self, seq_starts: np.ndarray) -> list[Batch]:
        return plan_batches(seq_starts, self.row_tokens, self.batch_tokens)

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


def engine_version(backend: str) -> str:
    """The software that computes the activations, as recorded in the cache metadata."""
    from .vllm_engine import vllm_distribution

    main = vllm_distribution() if backend == "vllm" else f"transformers {importlib.metadata.version('transformers')}"
    return f"{main}, torch {torch.__version__}"


def choose_backend(requested: str, hf_config: Any, vllm_args: str | None = None) -> tuple[str, str]:
    """(engine, why): ``auto`` takes vLLM where it is installed (in this Python, or in the project's
    vLLM venv, where the harvest then runs: see ``vllm_venv``) and supports the model, else transformers.

    Everything checkable without loading the model is checked here, before the cache is created.
    """
    from .vllm_engine import SETUP_HINT, parse_vllm_args, unsupported_reason, vllm_distribution
    from .vllm_venv import find_vllm_venv

    if requested not in BACKENDS:
        raise EngineError(f"--backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    parse_vllm_args(vllm_args)
    if requested == "hf":
        if vllm_args:
            raise EngineError("--vllm-args: only used by --backend vllm (or auto where vLLM is installed)")
        return "hf", "requested"
    installed = vllm_distribution()
    venv, no_venv = find_vllm_venv() if installed is None else (None, "")
    why_not = unsupported_reason(hf_config)
    if requested == "vllm":
        if installed is None and venv is None:
            raise EngineError(f"--backend vllm: vLLM is not installed in this Python and {no_venv}; {SETUP_HINT}")
        if why_not is not None:
            raise EngineError(f"--backend vllm: {why_not}; use --backend hf")
        return "vllm", "requested" if venv is None else f"requested; run by {venv}"
    fallback = f"not installed in this Python and {no_venv}" if installed is None and venv is None else why_not
    if fallback is not None:
        if vllm_args:
            raise EngineError(f"--vllm-args given but --backend auto cannot use vLLM: {fallback}")
        return "hf", f"auto: vLLM {fallback}" if installed is None and venv is None else f"auto: {fallback}"
    if venv is not None:
        return "vllm", f"auto: {venv} supports the model (this Python has no vLLM)"
    return "vllm", f"auto: {installed} is installed and supports the model"


def make_engine(cfg: HarvestConfig, n_layers: int, d_model: int, pad_id: int) -> Engine:
    """The engine ``cfg.backend`` names (already chosen: hf or vllm), loaded and ready to run."""
    if cfg.backend == "vllm":
        from fast_sae.lm import local_checkpoint, truncated_checkpoint

        from .vllm_engine import VLLMEngine, parse_vllm_args

        extra = parse_vllm_args(cfg.vllm_args)
        deepest = max(cfg.layers)
        path = (truncated_checkpoint(cfg.model, cfg.revision, deepest + 1) if deepest + 1 < n_layers
                else local_checkpoint(cfg.model, cfg.revision))
        return VLLMEngine(str(path), cfg.layers, n_layers, d_model, cfg.dtype, cfg.model_dtype, cfg.context_size,
                          cfg.batch_tokens, extra, cfg.device)
    from fast_sae.lm import load_model

    model = load_model(cfg.model, cfg.revision, cfg.model_dtype, cfg.device)
    return HFEngine(model, cfg.layers, cfg.dtype, pad_id, cfg.row_tokens, cfg.batch_tokens)
