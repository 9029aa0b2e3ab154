"""The harvest job: data → token stream → cache (token stream first) → forward batches → activations."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig

from fast_sae.actcache import CacheMeta, CacheWriter, TokenArrays
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer, model_info, resolve

from .data import EMBEDDED_CHAT, EMBEDDED_TEXT, DataSource, Fingerprint, iter_conversations, iter_texts
from .engine import Engine, choose_backend, engine_version, make_engine
from .render import template_info
from .streams import block_stream, chat_pieces, fast_stream, text_pieces


@dataclass
class HarvestConfig:
    out: Path
    model: str = EMBEDDED_MODEL
    revision: str | None = None
    regime: str = "fast"
    dataset: str | None = None  # default: embedded chat data (fast, bt-f) or embedded text (bt-p)
    dataset_split: str = "train"
    dataset_config: str | None = None
    text_field: str = "text"
    max_samples: int | None = None
    max_tokens: int | None = 200_000
    context_size: int = 1024
    layers: list[int] = field(default_factory=lambda: [3, 15])
    dtype: str = "float32"  # stored activations
    model_dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    chunk_tokens: int = 4096
    compression: str = "none"
    batch_tokens: int = 8192
    row_tokens: int = 512  # target length of a packed row (a longer sequence gets its own row)
    system_prompt: str | None = None
    doc_separator: str = "none"
    backend: str = "auto"  # auto | hf | vllm; resolved to the engine used before anything is written
    vllm_args: str | None = None  # JSON object of extra vllm.LLM keyword arguments

    def resolved(self) -> HarvestConfig:
        cfg = HarvestConfig(**asdict(self))
        cfg.out = Path(self.out)
        if cfg.dataset is None:
            cfg.dataset = EMBEDDED_TEXT if cfg.regime == "bt-p" else EMBEDDED_CHAT
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.model_dtype == "auto":
            cfg.model_dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
        cfg.layers = sorted(set(cfg.layers))
        return cfg

    def byte_args(self) -> dict[str, Any]:
        """Every argument that changes the cache's bytes; a resume must match all of them."""
        d = asdict(self)
        d.pop("out")
        d["device"] = d["device"].split(":")[0]
        return d


def build_stream(cfg: HarvestConfig, tokenizer: Any) -> tuple[TokenArrays, str, Any]:
    src = DataSource(cfg.dataset, cfg.dataset_split, cfg.dataset_config, cfg.max_samples)
    fp = Fingerprint()
    info = template_info(tokenizer, cfg.model, require_template=cfg.regime != "bt-p")
    sep_id = {"none": None, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}[cfg.doc_separator]
    if cfg.doc_separator != "none" and sep_id is None:
        raise ValueError(f"--doc-separator {cfg.doc_separator}: the tokenizer has no {cfg.doc_separator} token")
    if cfg.regime == "bt-p":
        stream = block_stream(text_pieces(iter_texts(src, cfg.text_field), tokenizer, fp),
                              cfg.context_size, cfg.max_tokens, sep_id)
    else:
        pieces = chat_pieces(iter_conversations(src), tokenizer, info, fp, cfg.system_prompt)
        if cfg.regime == "fast":
            stream = fast_stream(pieces, cfg.context_size, cfg.max_tokens)
        else:
            stream = block_stream(pieces, cfg.context_size, cfg.max_tokens, sep_id)
    return stream, fp.hexdigest(), info


def run_harvest(cfg: HarvestConfig, log: Any = print, engine: Engine | None = None) -> dict[str, Any]:
    """Harvest ``cfg`` into its cache; ``engine``: an already built engine for ``cfg`` (kept open), e.g. a
    benchmark's, else the one ``cfg.backend`` selects is built (after the cache exists) and closed."""
    cfg = cfg.resolved()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    hf_config = AutoConfig.from_pretrained(resolve(cfg.model), revision=cfg.revision)
    d_model, n_layers = model_info(hf_config)
    bad = [layer for layer in cfg.layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"--layers: layer {bad[0]} does not exist; {cfg.model} has layers 0..{n_layers - 1}")
    # the engine actually used goes into harvest_args, so a resume under another environment must match it
    cfg.backend, backend_why = (engine.name, "given") if engine else choose_backend(cfg.backend, hf_config,
                                                                                    cfg.vllm_args)
    stream, fingerprint, info = build_stream(cfg, tokenizer)
    meta = CacheMeta(
        model_id=cfg.model, model_revision=cfg.revision, d_model=d_model, n_model_layers=n_layers,
        layers=cfg.layers, dtype=cfg.dtype, regime=cfg.regime, context_size=cfg.context_size,
        dataset=cfg.dataset, dataset_fingerprint=fingerprint, chat_template_hash=info.template_hash,
        n_tokens=len(stream.ids), n_sequences=len(stream.seq_starts) - 1, chunk_tokens=cfg.chunk_tokens,
        compression=cfg.compression, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        special_token_ids=[int(i) for i in info.special_ids], harvest_args=cfg.byte_args(),
        engine=cfg.backend, engine_version=engine_version(cfg.backend), model_dtype=cfg.model_dtype)
    writer = CacheWriter.create_or_resume(cfg.out, meta, stream, tokenizer)
    resumed_from = writer.committed
    if writer.complete:
        writer.close()
        log(f"{cfg.out}: already complete ({meta.n_tokens} tokens); nothing to do")
        return {"out": str(cfg.out), "tokens": meta.n_tokens, "already_complete": True}
    if resumed_from:
        log(f"{cfg.out}: resuming at token {resumed_from} of {meta.n_tokens}")
    own_engine = engine is None
    try:
        if engine is None:
            engine = make_engine(cfg, n_layers, d_model, tokenizer.pad_token_id or 0)
    except BaseException:
        writer.close()
        raise
    batches = [b for b in engine.plan(stream.seq_starts) if b.end > resumed_from]
    t_fwd = time.perf_counter()
    try:
        with tqdm(total=meta.n_tokens, initial=resumed_from, unit="tok", unit_scale=True, desc="harvest",
                  dynamic_ncols=True) as bar:
            for batch in batches:
                writer.write(batch.start, engine.run(batch, stream.ids))
                bar.update(batch.end - max(batch.start, bar.n))
        stats = writer.finish()
    finally:
        if own_engine:
            engine.close()
        writer.close()
    elapsed = time.perf_counter() - t0
    done = meta.n_tokens - resumed_from
    summary = {
        "out": str(cfg.out), "model": cfg.model, "engine": f"{cfg.backend} ({backend_why})",
        "regime": cfg.regime, "dataset": cfg.dataset,
        "tokens": meta.n_tokens, "sequences": meta.n_sequences, "layers": cfg.layers, "d_model": d_model,
        "tokens_this_run": done, "resumed_from": resumed_from,
        "bytes": sum(f.stat().st_size for f in Path(cfg.out).rglob("*") if f.is_file()),
        "seconds": round(elapsed, 2), "tokens_per_second": round(done / max(time.perf_counter() - t_fwd, 1e-9), 1),
        "mean_sq_norm": {k: round(v["mean_sq_norm"], 3) for k, v in stats.items()},
    }
    return summary
