"""Benchmark: one harvest with 2 workers (two processes on one cache) against 1 worker (not a test).

Both runs are real CLI subprocesses of the same arguments, on the embedded model; each worker
prints its summary, from which the time is split into start-up (imports, tokenising the dataset,
creating or joining the cache, loading the model), forward passes (with the chunk writes behind
them), and the finishing step, and the tokens run twice (the batches at the boundary of the two
shares) are counted. On a 2-core CPU expect no speed-up: the forward pass already uses both cores.

Usage: python bench/harvest_workers.py [--max-tokens 12000] [--out-dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def run(out: Path, args: list[str], workers: int) -> tuple[float, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "harvest", "--out", str(out), *args, "--no-progress"]
    t = time.perf_counter()
    if workers == 1:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    else:
        procs = [subprocess.Popen([*cmd, "--worker", f"{i}/{workers}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for i in range(workers)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"harvest failed: {stderr[-2000:]}")
        outs.append(_summary(stdout))
    return time.perf_counter() - t, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=12000)
    ap.add_argument("--out-dir", type=Path, default=None)
    a = ap.parse_args()
    args = ["--max-tokens", str(a.max_tokens), "--layers", "3,15", "--context-size", "512", "--chunk-tokens", "1024",
            "--batch-tokens", "4096"]
    with tempfile.TemporaryDirectory(dir=a.out_dir) as tmp:
        t1, one = run(Path(tmp) / "one", args, 1)
        t2, two = run(Path(tmp) / "two", args, 2)
        same = all((Path(tmp) / "one" / f.relative_to(Path(tmp) / "two")).read_bytes() == f.read_bytes()
                   for f in (Path(tmp) / "two").rglob("*") if f.is_file())
    n = one[0]["tokens"]
    print(f"embedded model, {n} tokens, layers 3,15, {os.cpu_count()} CPU cores; byte-identical caches: {same}")
    print(f"1 worker : {t1:6.1f} s wall  ({n / t1:6.0f} tok/s)")
    print(f"2 workers: {t2:6.1f} s wall  ({n / t2:6.0f} tok/s)   speed-up 1w/2w = {t1 / t2:.2f}")
    print("where the time goes (per process):")
    print(f"  {'run':10s} {'total s':>8s} {'start-up':>9s} {'forward':>8s} {'finish':>7s} {'tokens':>7s} "
          f"{'computed':>9s} {'fwd tok/s':>10s}")
    for label, s in [("1 worker", one[0])] + [(f"worker {s['worker']}", s) for s in two]:
        startup = s["seconds"] - s["forward_seconds"] - s["finalize_seconds"]
        print(f"  {label:10s} {s['seconds']:8.1f} {startup:9.1f} {s['forward_seconds']:8.1f} "
              f"{s['finalize_seconds']:7.1f} {s['tokens_this_run']:7d} {s['tokens_computed']:9d} "
              f"{s['tokens_computed'] / max(s['forward_seconds'], 1e-9):10.0f}")
    extra = sum(s["tokens_computed"] for s in two) - one[0]["tokens_computed"]
    print(f"tokens run twice at the share boundary: {extra} ({100 * extra / n:.1f}% of the cache)")


if __name__ == "__main__":
    main()
