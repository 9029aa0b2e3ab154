"""Benchmark of the train stage: three ratios measured in one run (not a test).

1. loader: tokens/s of the training loader (sequential order, through the prefetch thread, with
   normalisation and the finiteness check) over a raw sequential ``readinto`` of the same chunk
   files (page cache warm for both). Goal >= 0.9. The mixing order is reported beside it.
2. step: one training step of one SAE (forward, backward, clipping, Adam, decoder renorm) over
   3x the time of the same-shape forward matmuls (x @ W_enc and f @ W_dec). Goal <= 1.4.
3. grid: K SAEs on one layer trained in one pass over the sum of K separate runs of the same
   tokens (whole runs: cache open, b_dec init, training, evaluation, saving). Goal <= 0.7.

Usage: python bench/train.py [--d 576] [--tokens-cache 131072] [--k 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
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
    opt = torch.optim.Adam(g.parameters(), lr=1e-4)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576, help="d_model (SmolLM2-135M: 576)")
    ap.add_argument("--tokens-cache", type=int, default=131072)
    ap.add_argument("--ef", type=int, default=8, help="expansion factor of the step benchmark")
    ap.add_argument("--grid-ef", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--grid-batch", type=int, default=1024)
    ap.add_argument("--grid-tokens", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        x = np.random.default_rng(0).standard_normal((args.tokens_cache, args.d), dtype=np.float32)
        cache = write_cache_from_arrays(work / "cache", {0: x}, seq_starts=np.arange(0, args.tokens_cache + 1, 256),
                                        chunk_tokens=16384)
        del x
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
        lo = bench_loader(cache, args.batch)
        print(f"loader: raw readinto {lo['raw_gbs']:.2f} GB/s, loader (sequential) {lo['loader_gbs']:.2f} GB/s, "
              f"mixing {lo['mixing_gbs']:.2f} GB/s -> ratio loader/raw = {lo['loader_gbs'] / lo['raw_gbs']:.2f} "
              f"(goal >= 0.9)")
        st = bench_step(args.d, args.ef, args.batch, args.device)
        print(f"step: d={args.d} d_sae={args.d * args.ef} batch={args.batch}: forward matmuls {st['matmul_s'] * 1e3:.1f} ms, "
              f"train step {st['step_s'] * 1e3:.1f} ms -> ratio step/(3x matmul) = "
              f"{st['step_s'] / (3 * st['matmul_s']):.2f} (goal <= 1.4)")
        gr = bench_grid(cache, args.k, args.grid_ef, args.grid_tokens, args.grid_batch, args.device, work)
        print(f"grid: K={args.k} standard SAEs on one layer, d_sae={args.d * args.grid_ef}, {args.grid_tokens} tokens, "
              f"batch {args.grid_batch}: one pass {gr['grid_s']:.2f} s, {args.k} separate runs {gr['separate_s']:.2f} s "
              f"-> ratio = {gr['grid_s'] / gr['separate_s']:.2f} (goal <= 0.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
