"""Where a vLLM harvest's time goes beyond vLLM's bare prefill: per-phase timers in one run (not a test).

  .venv-vllm/bin/python bench/harvest_profile.py [--tokens 8000] [--layers 3,15] [--repeat 2] [--cprofile N]

Builds one engine, then alternates a bare prefill of the harvest's segments (hooks off, nothing kept)
with a whole ``run_harvest`` on that engine, and reports, for the best harvest run, the wall seconds
spent in each phase: tokenizer/config loading, rendering and tokenising the stream, cache creation,
vLLM steps (the forward), the capture hooks (inside the steps), draining and placing captured rows,
handing rows to the writer, the writer thread's commits (statistics, encoding, checksums, file
writes: on its own thread, so it overlaps the forward), waiting for the writer at the end, and
finalising. The timers wrap the functions from outside (monkeypatching in this script only); the
harvest code is not changed by them. ``--cprofile N`` prints the N costliest functions of the main
thread of one more harvest run.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast_sae.actcache import writer as writer_mod  # noqa: E402
from fast_sae.harvest import run as run_mod  # noqa: E402
from fast_sae.harvest import vllm_capture  # noqa: E402
from fast_sae.harvest.run import HarvestConfig, build_stream, run_harvest  # noqa: E402
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer, model_info  # noqa: E402

WALL: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)  # thread CPU time of the calling thread


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        w, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            WALL[name] += time.perf_counter() - w
            CPU[name] += time.thread_time() - c
    return wrapper


def instrument(engine: Any) -> None:
    """Wrap the phases of run_harvest, the engine and the writer with timers."""
    run_mod.load_tokenizer = timed("load tokenizer", run_mod.load_tokenizer)
    cfg_cls = run_mod.AutoConfig

    class _Config:
        from_pretrained = staticmethod(timed("load config", cfg_cls.from_pretrained))
    setattr(run_mod, "AutoConfig", _Config)  # noqa: B010
    run_mod.build_stream = timed("render + tokenise stream", run_mod.build_stream)
    cw = writer_mod.CacheWriter
    setattr(cw, "open", classmethod(timed("create cache (token stream)", cw.__dict__["open"].__func__)))  # noqa: B010
    for attr, label in (("write", "writer.write (copy into chunks)"), ("_commit", "[writer thread] commit chunk"),
                        ("flush_wait", "wait for writer at end"), ("finalize", "finalize (stats, index)")):
        setattr(cw, attr, timed(label, getattr(cw, attr)))
    writer_mod.chunk_partials = timed("[writer thread]   statistics partials", writer_mod.chunk_partials)
    writer_mod.encode_chunk = timed("[writer thread]   encode chunk", writer_mod.encode_chunk)
    writer_mod.checksum = timed("[writer thread]   checksum", writer_mod.checksum)
    engine.llm.llm_engine.step = timed("vllm step (forward, hooks inside)", engine.llm.llm_engine.step)
    engine._take = timed("drain captured records (rpc)", engine._take)
    engine._place = timed("place rows in stream order", engine._place)
    engine._prompt = timed("build prompts (add_request input)", engine._prompt)
    add = engine.llm.llm_engine.add_request
    engine.llm.llm_engine.add_request = timed("add_request", add)
    orig_hook = vllm_capture.ResidualCapture._fs_hook

    def fs_hook(self: Any, layer: int) -> Any:
        return timed("  capture hooks (inside step)", orig_hook(self, layer))
    setattr(vllm_capture.ResidualCapture, "_fs_hook", fs_hook)  # noqa: B010


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--layers", default="3,15")
    ap.add_argument("--context-size", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cprofile", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoConfig

    from fast_sae.harvest.engine import make_engine
    from fast_sae.harvest.vllm_engine import VLLMEngine
    from fast_sae.lm import resolve

    layers = [int(x) for x in args.layers.split(",")]
    tok = load_tokenizer(args.model)
    base = dict(model=args.model, max_tokens=args.tokens, context_size=args.context_size, layers=layers,
                batch_tokens=args.batch_tokens, progress=False)
    cfg = HarvestConfig(out=Path("unused"), backend="vllm", **base).resolved()
    stream, _, _ = build_stream(cfg, tok)
    n = len(stream.ids)
    d_model, n_layers = model_info(AutoConfig.from_pretrained(resolve(args.model)))
    engine = make_engine(cfg, n_layers, d_model, tok.pad_token_id or 0)
    assert isinstance(engine, VLLMEngine)
    segments = engine.plan(stream.seq_starts)
    instrument(engine)
    engine.set_capture(True)  # reinstall with the timed hooks

    def bare() -> None:
        for seg in segments:
            engine.prefill(seg, stream.ids, capture=False)

    trash: list[Path] = []

    def harvest() -> None:
        out = Path(tempfile.mkdtemp()) / "c"
        run_harvest(HarvestConfig(out=out, backend="vllm", **base), log=lambda *_: None, engine=engine)
        trash.append(out.parent)  # deleted at the end: deleting is no part of a harvest

    engine.set_capture(False)
    bare()  # warm-up
    best: tuple[float, dict[str, float], dict[str, float]] | None = None
    bare_best = (0.0, 0.0)
    for _ in range(args.repeat):
        engine.set_capture(False)
        w, c = time.perf_counter(), time.process_time()
        bare()
        bw, bc = time.perf_counter() - w, time.process_time() - c
        if bare_best[0] == 0 or bw < bare_best[0]:
            bare_best = (bw, bc)
        engine.set_capture(True)
        WALL.clear()
        CPU.clear()
        w, c = time.perf_counter(), time.process_time()
        harvest()
        hw, hc = time.perf_counter() - w, time.process_time() - c
        print(f"run: bare {bw:.2f} s wall {bc:.2f} CPU-s, harvest {hw:.2f} s wall {hc:.2f} CPU-s, "
              f"ratio {bw / hw:.3f} wall {bc / hc:.3f} CPU", flush=True)
        if best is None or hw < best[0]:
            best = (hw, dict(WALL), dict(CPU))
    assert best is not None
    hw, wall, cpu = best
    bw, bc = bare_best
    print(f"\n{n} tokens, layers {args.layers}, {len(segments)} segment(s); load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; best of {args.repeat}")
    print(f"bare prefill {bw:.2f} s (tok/s {n / bw:.0f}), harvest {hw:.2f} s (tok/s {n / hw:.0f}): "
          f"ratio {bw / hw:.3f}")
    print(f"{'phase of the best harvest run':<48} {'wall s':>8} {'thread CPU s':>13}")
    for name in wall:
        print(f"{name:<48} {wall[name]:8.3f} {cpu[name]:13.3f}")
    if args.cprofile:
        engine.set_capture(True)
        prof = cProfile.Profile()
        prof.enable()
        harvest()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.cprofile)
        print(s.getvalue())
    engine.close()
    for folder in trash:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
