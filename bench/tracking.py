"""Benchmark: does Weights & Biases tracking slow training? (not a test)

Runs the same short ``pipeline.py train`` (its click command, in a fresh process on one torch
thread, then ``wandb.teardown()`` so W&B's service processes are reaped and counted) with and
without ``--wandb-project`` (offline mode, no network), interleaved, each in a fresh run folder, on
a synthetic cache, and reports per run: the wall time of the whole command; the training loop's
time (the trainer's "data wait: ... of X s" line: first batch to last step, every log point
included); the CPU time of the training process (all its threads) and of its children (W&B's
service and system monitor); and with tracking the tracker's own end-of-run line: the time inside
wandb calls (start, the sender thread, finish) and the time the training thread spent at the
--log-every points (queueing the rows: what a step can wait for). Goal: that last time a
negligible share of the loop. On a machine
shared with other jobs the wall-clock figures vary more between identical runs than any tracking
cost; the CPU and in-call times are the ones to compare there.

Usage: python bench/tracking.py [--reps 3] [--tokens 1024000] [--log-every 10] [--d 256]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fast_sae.actcache.from_arrays import write_cache_from_arrays  # noqa: E402

RUNNER = """
import resource, sys, torch
torch.set_num_threads(1)
from fast_sae.train.cli import train_cmd
train_cmd(sys.argv[1:], standalone_mode=False)
if sys.modules.get("wandb") is not None:
    sys.modules["wandb"].teardown()  # waits for W&B's processes, so their CPU time is counted below
own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"bench cpu: {own.ru_utime + own.ru_stime:.3f} s own, {kids.ru_utime + kids.ru_stime:.3f} s children")
"""


def run(cache: Path, out: Path, args: argparse.Namespace, tracked: bool, env: dict[str, str]) -> dict[str, float]:
    cmd = [sys.executable, "-c", RUNNER, str(cache), "--out", str(out), "--layers", "0",
           "--architectures", "standard,topk", "--expansion-factors", "4", "--k", "32", "--tokens", str(args.tokens),
           "--batch-tokens", str(args.batch_tokens), "--log-every", str(args.log_every), "--eval-sequences", "10",
           "--checkpoint-every", str(10 ** 9), "--no-progress"]
    if tracked:
        cmd += ["--wandb-project", "fast-sae-bench", "--wandb-mode", "offline"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    loop = re.search(r"data wait: [\d.]+ s of ([\d.]+) s", proc.stdout)
    in_wandb = re.search(r"wandb: (\d+) logging steps sent, ([\d.]+) s in wandb calls \(start, sender, finish\); "
                         r"([\d.]+) s at the training thread's log points", proc.stdout)
    cpu = re.search(r"bench cpu: ([\d.]+) s own, ([\d.]+) s children", proc.stdout)
    if loop is None or cpu is None or (tracked and in_wandb is None):
        raise SystemExit(f"unexpected output:\n{proc.stdout}")
    return {"wall": wall, "loop": float(loop.group(1)), "cpu": float(cpu.group(1)), "kids": float(cpu.group(2)),
            "wandb": float(in_wandb.group(2)) if in_wandb else 0.0,
            "at_log": float(in_wandb.group(3)) if in_wandb else 0.0,
            "points": float(in_wandb.group(1)) if in_wandb else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1_024_000)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--d", type=int, default=256)
    args = ap.parse_args()
    steps = args.tokens // args.batch_tokens
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n = args.tokens // 4  # the loop wraps around a smaller cache: the data read is not what is measured
        x = np.random.default_rng(0).standard_normal((n, args.d)).astype(np.float32)
        cache = write_cache_from_arrays(tmp / "cache", {0: x}, seq_starts=np.arange(0, n + 1, 128),
                                        chunk_tokens=16384)
        env = dict(os.environ, WANDB_CONFIG_DIR=str(tmp / "wbc"), WANDB_CACHE_DIR=str(tmp / "wbk"),
                   WANDB_DATA_DIR=str(tmp / "wbd"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        print(f"train: d={args.d}, 2 SAEs (standard, topk k=32) x4, {steps} steps of {args.batch_tokens} tokens, "
              f"log every {args.log_every} steps ({steps // args.log_every} log points); {args.reps} runs each, "
              f"interleaved; 1 torch thread; load average before: {os.getloadavg()[0]:.1f}")
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for i in range(args.reps):
            for tracked in (False, True):
                r = run(Path(cache), tmp / f"run_{i}_{int(tracked)}", args, tracked, env)
                results[tracked].append(r)
                print(f"  {'wandb offline' if tracked else 'no tracking  '}  wall {r['wall']:6.1f} s  "
                      f"loop {r['loop']:6.1f} s ({1000 * r['loop'] / steps:.1f} ms/step)  CPU {r['cpu']:5.1f} s "
                      f"own + {r['kids']:4.1f} s children"
                      + (f"  in wandb calls {r['wandb']:.2f} s, {1000 * r['at_log'] / r['points']:.2f} ms per log "
                         f"point ({int(r['points'])})" if tracked else ""))
        keys = ("wall", "loop", "cpu", "kids", "wandb", "at_log")
        off = {k: statistics.median(r[k] for r in results[False]) for k in keys}
        on = {k: statistics.median(r[k] for r in results[True]) for k in keys}
        print(f"median  no tracking: wall {off['wall']:.1f} s, loop {off['loop']:.1f} s, CPU {off['cpu']:.1f} s own "
              f"+ {off['kids']:.1f} s children | wandb offline: wall {on['wall']:.1f} s, loop {on['loop']:.1f} s, "
              f"CPU {on['cpu']:.1f} s own + {on['kids']:.1f} s children, in wandb calls {on['wandb']:.2f} s "
              f"({on['at_log']:.3f} s at the log points)")
        print(f"with / without tracking: loop {on['loop'] / off['loop']:.3f}, wall {on['wall'] / off['wall']:.3f}, "
              f"own CPU {on['cpu'] / off['cpu']:.3f}; the log points add {1000 * on['at_log'] / steps:.3f} ms per "
              f"step on average (a step: {1000 * off['loop'] / steps:.1f} ms); load average after: "
              f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
