"""Benchmark of the train stage: three ratios measured in one run (not a test).

1. loader: tokens/s of the training loader (sequential order, through the prefetch thread, with
   normalisation and the finiteness check) over a raw sequential ``readinto`` of the same chunk
   files (page cache warm for both). Goal >= 0.9. The mixing order is reported beside it.
2. step: one training step of one SAE (forward, backward, clipping, Adam, decoder renorm) over
   3x the time of the same-shape forward matmuls (x @ W_enc and f @ W_dec). Goal <= 1.4.
3. grid: K SAEs on one layer trained in one pass over the sum of K separate runs of the same
   tokens (whole runs: cache open, b_dec init, training, evaluation, saving). Goal <= 0.7.
4. topk: one TopK / BatchTopK training step on the sparse decoder path, on the dense path, in
   SAELens (its training SAE and trainer step) and, for TopK, in EleutherAI sparsify (its Trainer's
   step; run with .venv-sparsify/bin/python after bench/setup_sparsify.sh), at each d_sae x k,
   against the floor: the encoder's dense forward product alone, timed in the same run. Goals:
   sparse <= 1.5x the floor (d_sae 18,432, k 32), >= 2x SAELens, >= 1.5x sparsify. Rows with
   ``--dead-frac`` of the latents dead run AuxK in all.
5. standard: one Standard SAE step here and in SAELens, the same loss (L1 weighted by decoder
   norms, no b_dec subtracted from the input). Goal >= 1.2x SAELens.
6. memory: peak resident memory of a TopK step per decoder path (a fresh process each) against
   the estimate printed before training (memory.py).

Usage: python bench/train.py [--sections loader,step,grid,topk,standard,memory] [--d 576] [--device cpu]
       python bench/train.py --sections topk --widths 4608 --ks 32 --reps 2   # a quick subset
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast_sae.actcache import ActivationCache  # noqa: E402
from fast_sae.actcache.from_arrays import write_cache_from_arrays  # noqa: E402
from fast_sae.train.buffer import BatchOrder  # noqa: E402
from fast_sae.train.config import GridConfig, SAESpec, TrainConfig  # noqa: E402
from fast_sae.train.loader import LayerReader, Prefetcher, TokenStream  # noqa: E402
from fast_sae.train.saes import GROUP_CLASSES  # noqa: E402
from fast_sae.train.trainer import Trainer  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import steps  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_loader(cache_path: Path, batch: int) -> dict[str, float]:
    cache = ActivationCache.open(cache_path)
    files = [cache.chunk_file(0, i) for i in range(cache.n_chunks)]
    nbytes = sum(f.stat().st_size for f in files)
    buf = bytearray(cache.chunk_bytes())

    def raw() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buf)

    n = cache.n_tokens
    steps = n // batch
    scale = 0.37

    def loader(order: str) -> None:
        stream = TokenStream({0: LayerReader(cache, 0, scale)}, n)
        bo = BatchOrder(order, stream, batch, buffer_tokens=1 << 16, seed=0)
        pf = Prefetcher(lambda: bo.blocks(0, steps), depth=2)
        for block in pf:
            for i in range(block.n_steps):
                block.acts[0][i * batch:(i + 1) * batch]
        pf.close()

    t_raw = median_time(raw, 5)
    t_seq = median_time(lambda: loader("sequential"), 5)
    t_mix = median_time(lambda: loader("mixing"), 3)
    used = steps * batch * cache.meta.d_model * 4
    return {"raw_gbs": nbytes / t_raw / 1e9, "loader_gbs": used / t_seq / 1e9, "mixing_gbs": used / t_mix / 1e9}


def bench_step(d: int, ef: int, batch: int, device: str) -> dict[str, float]:
    cfg = TrainConfig(device=device)
    g = GROUP_CLASSES["standard"]([SAESpec(0, "standard", ef, 5.0)], d, cfg, torch.zeros(d)).to(device)
    opt = g.make_optimizer()  # the trainer's Adam
    x = torch.randn(batch, d, device=device)
    w_enc, w_dec = torch.randn(d, d * ef, device=device), torch.randn(d * ef, d, device=device)
    f = torch.relu(torch.randn(batch, d * ef, device=device))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def matmuls() -> None:
        x @ w_enc
        f @ w_dec
        sync()

    def step() -> None:
        Trainer._step(g, opt, x, 1e-4, 1.0)
        sync()

    reps = 5 if device == "cpu" else 50
    return {"matmul_s": median_time(matmuls, reps), "step_s": median_time(step, reps)}


def bench_grid(cache_path: Path, k: int, ef: int, tokens: int, batch: int, device: str, work: Path) -> dict[str, float]:
    cfg = TrainConfig(tokens=tokens, batch_tokens=batch, buffer_tokens=1 << 15, log_every=10, eval_sequences=0,
                      eval_max_tokens=4096, device=device, checkpoint_every=10 ** 9)
    coefs = [1.0 + i for i in range(k)]

    def run(name: str, values: list[float]) -> float:
        grid = GridConfig(layers=[0], architectures=["standard"], expansion_factors=[ef], l1_coefficients=values)
        t = time.perf_counter()
        Trainer(cache_path, work / name, cfg, grid, echo=lambda s: None, progress=False).run()
        return time.perf_counter() - t

    t_grid = run("grid", coefs)
    t_sep = sum(run(f"alone{i}", [c]) for i, c in enumerate(coefs))
    return {"grid_s": t_grid, "separate_s": t_sep}


def interleaved_medians(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Median seconds per call of each callable, timed in alternation (load drifts hit all alike)."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, Adam state
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_topk(d: int, widths: list[int], ks: list[int], batch: int, reps: int, device: str, dead_frac: float,
               saelens: bool, archs: tuple[str, ...] = ("topk",), dense: bool = True) -> None:
    """Each step against its floor (the encoder's dense forward product alone, timed in the same
    interleaved run) and beside the peers: SAELens (TopK, BatchTopK) and sparsify (TopK) where installed."""
    x = torch.randn(batch, d, device=device)
    has_sparsify = steps.sparsify_version() is not None
    print(f"topk: one training step, batch {batch}, d_model {d} (median of {reps}, interleaved; floor = the encoder's "
          f"forward product alone, x @ W_enc + b_enc)")
    print(f"{'arch':>9} {'d_sae':>6} {'k':>4} {'dead':>5} | {'floor ms':>8} {'sparse ms':>9} {'dense ms':>9} "
          f"{'SAELens ms':>10} {'sparsify ms':>11} | {'sparse/floor':>12} {'SL/sparse':>9} {'spfy/sparse':>11}")
    deads = [0.0] + ([dead_frac] if dead_frac > 0 else [])
    for arch in archs:
        for dead in deads:
            for m in widths:
                for k in ks:
                    fns = {"floor": steps.floor(x, m), "sparse": steps.ours(arch, x, m, k, "sparse", dead)[0]}
                    if dense:
                        fns["dense"] = steps.ours(arch, x, m, k, "dense", dead)[0]
                    if saelens:
                        fns["SAELens"] = steps.saelens(arch, x, m, k, dead)
                    if has_sparsify and arch == "topk":
                        fns["sparsify"] = steps.sparsify(x, m, k, dead)
                    t = interleaved_medians(fns, reps)
                    del fns
                    cols = zip(("floor", "sparse", "dense", "SAELens", "sparsify"), (8, 9, 9, 10, 11))
                    ms = " ".join(f"{t[c] * 1e3:{w}.0f}" if c in t else f"{'-':>{w}}" for c, w in cols)
                    sl, sp = t.get("SAELens"), t.get("sparsify")
                    print(f"{arch:>9} {m:>6} {k:>4} {dead:>5.2f} | {ms} | {t['sparse'] / t['floor']:12.2f} "
                          f"{(sl / t['sparse']) if sl else float('nan'):9.2f} "
                          f"{(sp / t['sparse']) if sp else float('nan'):11.2f}", flush=True)


def bench_standard(d: int, widths: list[int], batch: int, reps: int, device: str) -> None:
    x = torch.randn(batch, d, device=device)
    print(f"standard: one training step, batch {batch}, d_model {d}, L1 5 weighted by decoder norms, "
          f"no b_dec on the input (median of {reps})")
    print(f"{'d_sae':>6} | {'ours ms':>8} {'SAELens ms':>10} | {'ours tok/s':>10} {'SAELens tok/s':>13} | "
          f"{'ours/SL':>7}")
    for m in widths:
        t = interleaved_medians({"ours": steps.ours("standard", x, m, 5.0, l1_decoder_norm=True)[0],
                                 "SAELens": steps.saelens("standard", x, m, 5.0, apply_b_dec_to_input=False)}, reps)
        print(f"{m:>6} | {t['ours'] * 1e3:8.0f} {t['SAELens'] * 1e3:10.0f} | {batch / t['ours']:10.0f} "
              f"{batch / t['SAELens']:13.0f} | {t['SAELens'] / t['ours']:7.2f}", flush=True)


def bench_memory(d: int, widths: list[int], ks: list[int], batch: int, dead_frac: float) -> None:
    print(f"memory: peak resident memory of TopK steps (fresh process each, {dead_frac:.0%} latents dead so AuxK "
          f"runs) vs the estimate (state + step activations)")
    print(f"{'d_sae':>6} {'k':>4} {'path':>6} | {'measured MiB':>12} {'estimate MiB':>12} {'est/meas':>8}")
    for m in widths:
        for k in ks:
            for path in ("sparse", "dense"):
                args = [sys.executable, str(BENCH / "steps.py"), "--memory", "topk", str(d), str(m), str(k), path,
                        str(dead_frac), str(batch)]
                proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0:
                    print(f"{m:>6} {k:>4} {path:>6} | failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{m:>6} {k:>4} {path:>6} | {r['measured'] / 2**20:12.0f} {r['estimate'] / 2**20:12.0f} "
                      f"{r['estimate'] / r['measured']:8.2f}", flush=True)


def _ints_arg(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


SECTIONS = ("loader", "step", "grid", "topk", "standard", "memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--d", type=int, default=576, help="d_model (SmolLM2-135M: 576)")
    ap.add_argument("--tokens-cache", type=int, default=131072)
    ap.add_argument("--ef", type=int, default=8, help="expansion factor of the step benchmark")
    ap.add_argument("--grid-ef", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--grid-batch", type=int, default=1024)
    ap.add_argument("--grid-tokens", type=int, default=65536)
    ap.add_argument("--widths", type=_ints_arg, default=[4608, 18432], help="d_sae values of topk/standard/memory")
    ap.add_argument("--ks", type=_ints_arg, default=[32, 64, 128], help="k values of topk/memory")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per configuration (topk, standard)")
    ap.add_argument("--dead-frac", type=float, default=0.3,
                    help="topk rows with this fraction of latents dead (AuxK on); 0 = none; memory uses it too")
    ap.add_argument("--no-saelens", action="store_true", help="topk: skip SAELens")
    ap.add_argument("--no-dense", action="store_true", help="topk: skip the dense path")
    ap.add_argument("--archs", default="topk,batchtopk", help="topk section: architectures (topk, batchtopk)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)} (expected {', '.join(SECTIONS)})")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if {"topk", "standard"} & set(sections) and not args.no_saelens:
        spfy = steps.sparsify_version() or "not installed (bench/setup_sparsify.sh, then .venv-sparsify/bin/python)"
        print(f"sae_lens {steps.saelens_version()}, eai-sparsify {spfy}")
    if {"loader", "step", "grid"} & set(sections):
        bench_stage(args, sections)
    if "topk" in sections:
        bench_topk(args.d, args.widths, args.ks, args.batch, args.reps, args.device, args.dead_frac,
                   not args.no_saelens, tuple(a.strip() for a in args.archs.split(",")), not args.no_dense)
    if "standard" in sections:
        bench_standard(args.d, args.widths, args.batch, args.reps, args.device)
    if "memory" in sections:
        bench_memory(args.d, args.widths, args.ks, args.batch, args.dead_frac or 0.3)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def bench_stage(args: argparse.Namespace, sections: list[str]) -> None:
    """Sections 1-3 (on a synthetic cache written to a temporary folder)."""
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        x = np.random.default_rng(0).standard_normal((args.tokens_cache, args.d), dtype=np.float32)
        cache = write_cache_from_arrays(work / "cache", {0: x}, seq_starts=np.arange(0, args.tokens_cache + 1, 256),
                                        chunk_tokens=16384)
        del x
        if "loader" in sections:
            lo = bench_loader(cache, args.batch)
            print(f"loader: raw readinto {lo['raw_gbs']:.2f} GB/s, loader (sequential) {lo['loader_gbs']:.2f} GB/s, "
                  f"mixing {lo['mixing_gbs']:.2f} GB/s -> ratio loader/raw = {lo['loader_gbs'] / lo['raw_gbs']:.2f} "
                  f"(goal >= 0.9)")
        if "step" in sections:
            st = bench_step(args.d, args.ef, args.batch, args.device)
            print(f"step: d={args.d} d_sae={args.d * args.ef} batch={args.batch}: forward matmuls "
                  f"{st['matmul_s'] * 1e3:.1f} ms, train step {st['step_s'] * 1e3:.1f} ms -> ratio step/(3x matmul) = "
                  f"{st['step_s'] / (3 * st['matmul_s']):.2f} (goal <= 1.4)")
        if "grid" in sections:
            gr = bench_grid(cache, args.k, args.grid_ef, args.grid_tokens, args.grid_batch, args.device, work)
            print(f"grid: K={args.k} standard SAEs on one layer, d_sae={args.d * args.grid_ef}, {args.grid_tokens} "
                  f"tokens, batch {args.grid_batch}: one pass {gr['grid_s']:.2f} s, {args.k} separate runs "
                  f"{gr['separate_s']:.2f} s -> ratio = {gr['grid_s'] / gr['separate_s']:.2f} (goal <= 0.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
