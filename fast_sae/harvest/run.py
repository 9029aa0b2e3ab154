"""The harvest job: data → token stream → cache (token stream first) → forward batches → activations."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig

from fast_sae.actcache import REGIMES, CacheMeta, CacheWriter, StorageConfig, TokenArrays, parse_location
from fast_sae.actcache.store import open_store
from fast_sae.actcache.writer import parse_worker
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer, model_info, resolve
from fast_sae.options import setting
from fast_sae.redact import redact_tree, redact_url

from .data import EMBEDDED_CHAT, EMBEDDED_TEXT, DataSource, Fingerprint, iter_conversations, iter_texts
from .engine import BACKENDS, Engine, choose_backend, engine_version, make_engine
from .render import OTHER_ROLES, SPECIAL_IN_CONTENT, RenderPolicy, template_info
from .streams import DOC_SETS, SEPARATORS, DocSelection, block_stream, chat_pieces, fast_stream, text_pieces
from .vllm_engine import vllm_distribution
from .vllm_venv import find_vllm_venv, run_in_venv


@dataclass
class HarvestConfig:
    """Everything a harvest depends on; every field is also a `pipeline.py harvest` option."""

    out: Path = setting(help="Cache folder or URL (s3://bucket/prefix, gs://..., az://...) to write or resume.",
                        short="-o")
    model: str = setting(EMBEDDED_MODEL, help="Hub id, local folder, or the embedded default.")
    revision: str | None = setting(None, help="Hub revision (branch, tag or commit).")
    regime: str = setting("fast", choices=REGIMES,
                          help="fast: one templated conversation per sequence; bt-f: templated chats packed "
                               "into blocks; bt-p: plain text packed into blocks.")
    dataset: str | None = setting(None, help="HF dataset name or local json/jsonl/parquet/csv path "
                                             "[default: embedded:chatterbot-en, or embedded:python-docs for bt-p].")
    dataset_split: str = setting("train", help="Split of a hub dataset.")
    dataset_config: str | None = setting(None, help="Config (subset) of a hub dataset.")
    text_field: str = setting("text", help="Text column for bt-p.")
    max_samples: int | None = setting(None, help="Read at most this many samples.")
    docs: str = setting("all", choices=DOC_SETS,
                        help="Which documents: all, only the held-out sample (an evaluation cache), or all but "
                             "it (training caches); a document is held out iff a hash of (holdout seed, its "
                             "dataset index) falls below --holdout-fraction.")
    holdout_fraction: float = setting(0.0, help="Share of the dataset's documents in the held-out sample.")
    holdout_seed: int = setting(0, help="Seed of the held-out sample (the same seed and fraction give the same "
                                        "documents in every regime).")
    max_tokens: int | None = setting(200_000, help="Token budget of the cache (counted after --docs).")
    context_size: int = setting(1024, help="FAST: truncation length; BT: block length.")
    layers: list[int] = setting(default_factory=lambda: [3, 15],
                                help="Decoder blocks whose output (resid_post) is stored, 0-indexed.")
    dtype: str = setting("float32", choices=("float32", "float16"), help="Storage dtype of activations.")
    model_dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"),
                               help="Compute dtype (auto: bf16 on GPU, fp32 on CPU).")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:1 ...")
    chunk_tokens: int = setting(4096, help="Tokens per chunk file.")
    compression: str = setting("none", choices=("none", "zstd"), help="Chunk compression.")
    batch_tokens: int = setting(8192, help="Tokens per forward batch.")
    row_tokens: int = setting(512, help="Target length of a packed row of consecutive sequences "
                                        "(a longer sequence gets its own row).")
    system_prompt: str | None = setting(None, help="Add this system message to conversations without one "
                                                   "(else the template's default applies).")
    doc_separator: str = setting("none", choices=SEPARATORS, help="BT regimes: token inserted before each document.")
    special_in_content: str = setting("escape", choices=SPECIAL_IN_CONTENT,
                                      help="Special-token text typed inside a message (e.g. '<|im_end|>'): "
                                           "escape = tokenize it as plain text; refuse = stop with an error.")
    other_roles: str = setting("refuse", choices=OTHER_ROLES,
                               help="Messages whose role is not system/user/assistant (tool, ...): refuse = stop "
                                    "with an error; label = store them with role code 'other'.")
    backend: str = setting("auto", choices=BACKENDS,
                           help="Forward engine: hf (transformers), vllm (needs vLLM in this Python or in the venv "
                                "./setup_vllm.sh creates, .venv-vllm/, where the harvest then runs by itself), "
                                "auto (vllm where installed and the model is supported, else hf). Resolved to "
                                "the engine used before anything is written.")
    vllm_args: str | None = setting(None, help="JSON object of extra vllm.LLM keyword arguments, e.g. "
                                               "'{\"gpu_memory_utilization\": 0.8}'.")
    progress: bool = setting(True, help="Show a progress bar.")
    worker: str | None = setting(None, metavar="I/N",
                                 help="Write only worker I's share of N (0-indexed) of the activation chunks; the "
                                      "last worker to finish completes the cache [default: 0/1, or RANK/WORLD_SIZE "
                                      "under torchrun].")
    finalize: bool = setting(False, help="Only complete the cache (statistics, checksum index) once every "
                                         "worker's chunks are written.")
    storage: StorageConfig = setting(default_factory=StorageConfig, prefix="", help="Remote cache location.")

    def resolved(self) -> HarvestConfig:
        cfg = HarvestConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        cfg.out = self.out
        if cfg.dataset is None:
            cfg.dataset = EMBEDDED_TEXT if cfg.regime == "bt-p" else EMBEDDED_CHAT
        if cfg.worker is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one worker per rank
            cfg.worker = f"{os.environ.get('RANK', '0')}/{os.environ['WORLD_SIZE']}"
            if cfg.device == "auto" and torch.cuda.is_available():
                cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.model_dtype == "auto":
            cfg.model_dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
        cfg.layers = sorted(set(cfg.layers))
        return cfg

    def byte_args(self) -> dict[str, Any]:
        """Every argument that changes the cache's bytes; a resume must match all of them."""
        d = asdict(self)
        for key in ("out", "progress", "worker", "finalize", "storage"):  # where and by whom, not what
            d.pop(key)
        d["device"] = d["device"].split(":")[0]
        return d


def build_stream(cfg: HarvestConfig, tokenizer: Any) -> tuple[TokenArrays, str, Any]:
    assert cfg.dataset is not None  # resolved() chose the embedded default
    src = DataSource(cfg.dataset, cfg.dataset_split, cfg.dataset_config, cfg.max_samples)
    selection = DocSelection(cfg.docs, cfg.holdout_fraction, cfg.holdout_seed)
    fp = Fingerprint()
    info = template_info(tokenizer, cfg.model, require_template=cfg.regime != "bt-p")
    sep_id = {"none": None, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}[cfg.doc_separator]
    if cfg.doc_separator != "none" and sep_id is None:
        raise ValueError(f"--doc-separator {cfg.doc_separator}: the tokenizer has no {cfg.doc_separator} token")
    if cfg.regime == "bt-p":
        stream = block_stream(text_pieces(iter_texts(src, cfg.text_field), tokenizer, fp, selection),
                              cfg.context_size, cfg.max_tokens, sep_id)
    else:
        pieces = chat_pieces(iter_conversations(src), tokenizer, info, fp, cfg.system_prompt,
                             RenderPolicy(cfg.special_in_content, cfg.other_roles), selection=selection)
        if cfg.regime == "fast":
            stream = fast_stream(pieces, cfg.context_size, cfg.max_tokens)
        else:
            stream = block_stream(pieces, cfg.context_size, cfg.max_tokens, sep_id)
    return stream, fp.hexdigest(), info


def run_harvest(cfg: HarvestConfig, log: Any = print, engine: Engine | None = None,
                tokenizer: Any | None = None) -> dict[str, Any]:
    """Harvest ``cfg`` into its cache; ``engine``: an already built engine for ``cfg`` (kept open), e.g. a
    benchmark's, else the one ``cfg.backend`` selects is built (after the cache exists) and closed;
    ``tokenizer``: ``cfg.model``'s tokenizer already loaded (a benchmark's: loading it takes 1-3 s here,
    a fixed cost per run like the engine's start-up), else it is loaded."""
    cfg = cfg.resolved()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.revision) if tokenizer is None else tokenizer
    hf_config = AutoConfig.from_pretrained(resolve(cfg.model), revision=cfg.revision)
    d_model, n_layers = model_info(hf_config)
    bad = [layer for layer in cfg.layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"--layers: layer {bad[0]} does not exist; {cfg.model} has layers 0..{n_layers - 1}")
    # the engine actually used goes into harvest_args, so a resume under another environment must match it
    cfg.backend, backend_why = (engine.name, "given") if engine else choose_backend(cfg.backend, hf_config,
                                                                                    cfg.vllm_args)
    if engine is None and cfg.backend == "vllm" and vllm_distribution() is None:
        venv, _ = find_vllm_venv()  # choose_backend found it: the harvest runs there, this process waits
        assert venv is not None
        return run_in_venv(venv, cfg, backend_why, log)
    stream, fingerprint, info = build_stream(cfg, tokenizer)
    meta = CacheMeta(
        model_id=cfg.model, model_revision=cfg.revision, d_model=d_model, n_model_layers=n_layers,
        layers=cfg.layers, dtype=cfg.dtype, regime=cfg.regime, context_size=cfg.context_size,
        dataset=redact_url(cfg.dataset or ""), dataset_fingerprint=fingerprint, chat_template_hash=info.template_hash,
        n_tokens=len(stream.ids), n_sequences=len(stream.seq_starts) - 1, chunk_tokens=cfg.chunk_tokens,
        compression=cfg.compression, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        special_token_ids=[int(i) for i in info.special_ids],
        # a URL's credentials hidden, the same on every resume, so the comparison still holds
        harvest_args=redact_tree(cfg.byte_args()),
        engine=cfg.backend, engine_version=engine_version(cfg.backend), model_dtype=cfg.model_dtype)
    worker = parse_worker(cfg.worker or "0/1")
    options = cfg.storage.options()
    where = parse_location(cfg.out)
    writer = CacheWriter.open(where, meta, stream, tokenizer, worker=worker, options=options, log=log)
    me = f"worker {worker[0]}/{worker[1]}: " if worker[1] > 1 else ""
    pending = list(writer.pending)
    base = {"out": str(where), "tokens": meta.n_tokens, "worker": f"{worker[0]}/{worker[1]}"}
    if writer.complete:
        writer.close()
        log(f"{where}: already complete ({meta.n_tokens} tokens); nothing to do")
        return {**base, "already_complete": True}
    if cfg.finalize:
        try:
            stats = writer.finalize()
        finally:
            writer.close()
        log(f"{where}: complete")
        return {**base, "finalized": True, "mean_sq_norm": {k: round(v["mean_sq_norm"], 3) for k, v in stats.items()}}
    share = writer.share
    if len(pending) < len(share):
        log(f"{where}: {me}resuming; {len(share) - len(pending)} of {len(share)} chunks of this share already done")
    tokens_todo = sum(writer.chunk_range(i)[1] - writer.chunk_range(i)[0] for i in pending)
    t_fwd = time.perf_counter()
    computed = 0  # tokens run through the model: the batches at a share's ends are also run by a neighbour
    try:
        if pending:
            own_engine = engine is None
            if engine is None:
                engine = make_engine(cfg, n_layers, d_model, tokenizer.pad_token_id or 0)
            t_fwd = time.perf_counter()  # the model is loaded: forward time starts here
            batches = [b for b in engine.plan(stream.seq_starts) if writer.wants(b.start, b.end)]
            try:
                with tqdm(total=tokens_todo, unit="tok", unit_scale=True, desc=f"harvest {me}".strip(),
                          dynamic_ncols=True, disable=not cfg.progress) as bar:
                    # an engine that hands out rows as its forward steps finish (vLLM) lets the writer commit
                    # chunks during the segment, not all after it
                    pieces = getattr(engine, "run_pieces", None)
                    for batch in batches:
                        if pieces is None:
                            writer.write(batch.start, engine.run(batch, stream.ids))
                        else:
                            for start, acts in pieces(batch, stream.ids):
                                writer.write(start, acts)
                        computed += batch.n_tokens
                        bar.update(batch.n_tokens)
                    writer.flush_wait()
            finally:
                if own_engine:
                    engine.close()
        t_done = time.perf_counter()
        missing = writer.missing_chunks()
        if missing:
            log(f"{where}: {me}share done; {len(missing)} chunks of other workers still to come (the last worker, "
                f"or harvest --finalize, completes the cache)")
            result: dict[str, Any] | None = None
        else:
            result = writer.finalize()
        t_final = time.perf_counter() - t_done
    finally:
        writer.close()
    elapsed = time.perf_counter() - t0
    summary = {
        **base, "model": cfg.model, "engine": f"{cfg.backend} ({backend_why})", "regime": cfg.regime,
        "dataset": redact_url(cfg.dataset or ""),
        "sequences": meta.n_sequences, "layers": cfg.layers, "d_model": d_model,
        "tokens_this_run": tokens_todo, "tokens_computed": computed, "chunks_this_run": len(pending),
        "complete": result is not None, "forward_seconds": round(t_done - t_fwd, 2),
        "finalize_seconds": round(t_final, 2),
        "bytes": sum(open_store(where, options).list().values()),
        "seconds": round(elapsed, 2),
        "tokens_per_second": round(tokens_todo / max(t_done - t_fwd, 1e-9), 1),
    }
    if result is not None:
        summary["mean_sq_norm"] = {k: round(v["mean_sq_norm"], 3) for k, v in result.items()}
    return summary
