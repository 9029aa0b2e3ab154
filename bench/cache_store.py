"""Benchmark of the cache's storage paths: ratios measured in one run (not a test).

1. checksums: xxh3-64 (what the cache records), crc32c (google-crc32c) and zlib's crc32, against a
   memcpy of the same 9 MiB chunk.
2. local loader with verification: the training loader (sequential stream, float32 copy, scale,
   finiteness, and the xxh3 of each chunk on its first read, on read-ahead threads) over a raw
   ``readinto`` of the same chunk files; one pass of a freshly opened cache (so every chunk is
   verified), page cache warm. Verification off beside it.
3. S3 loader: the same loader reading the cache from a real S3 server (SeaweedFS on 127.0.0.1,
   started here) through the read-ahead, over a raw read of the same chunk objects with the same
   number of requests in flight (no checksum, no decode, no copy). Uncompressed and zstd.

Usage: python bench/cache_store.py [--tokens 131072] [--d 576] [--chunk 4096]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fast_sae.actcache import ActivationCache  # noqa: E402
from fast_sae.actcache.from_arrays import write_cache_from_arrays  # noqa: E402
from fast_sae.actcache.integrity import checksum_int  # noqa: E402
from fast_sae.actcache.prefetch import POOL_THREADS  # noqa: E402
from fast_sae.actcache.store import open_store  # noqa: E402
from fast_sae.train.loader import LayerReader, TokenStream  # noqa: E402


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_checksums() -> None:
    x = np.random.default_rng(0).standard_normal((4096, 576)).astype(np.float32)
    data = x.tobytes()
    out = np.empty_like(x)
    rows = [("memcpy", lambda: np.copyto(out, x)), ("xxh3-64 (recorded)", lambda: checksum_int(data)),
            ("zlib crc32", lambda: zlib.crc32(data))]
    try:
        import google_crc32c

        rows.insert(2, ("crc32c (google-crc32c)", lambda: google_crc32c.value(data)))
    except ImportError:
        pass
    print(f"checksum of one {len(data) / 2**20:.0f} MiB chunk:")
    for name, fn in rows:
        t = statistics.median([best_of(fn, 1) for _ in range(15)])
        print(f"  {name:24s} {len(data) / t / 1e9:6.2f} GB/s")


def loader_pass(cache: ActivationCache, n: int, block: int, passes: int = 1) -> list[float]:
    """Passes of the training loader over tokens [0, n): blocks of ``block`` rows copied (scaled,
    checked finite, verified on first read) into a reused float32 buffer, as the trainer's
    recycled block buffers are. The first pass of a freshly opened cache maps (and, with
    verification, hashes) every chunk; later passes, the next epochs of a run, do neither."""
    reader = LayerReader(cache, 0, 0.37)
    TokenStream({0: reader}, n)  # sets the stream's wrap point, as training does
    out = np.empty((block, cache.d_model), np.float32)
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        for pos in range(0, n, block):
            m = min(block, n - pos)
            reader.read_into(out[:m], pos)
        times.append(time.perf_counter() - t)
    return times


def bench_local(path: Path, n: int, block: int) -> None:
    cache = ActivationCache.open(path)
    files = [Path(str(cache.chunk_file(0, i))) for i in range(cache.n_chunks)]
    nbytes = sum(f.stat().st_size for f in files)
    buf = bytearray(cache.chunk_bytes())
    # the loader's destination: one block of `block` rows, filled chunk file by chunk file
    dest = memoryview(np.empty((block, cache.d_model), np.float32)).cast("B")

    def raw() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buf)

    def raw_block() -> None:
        pos = 0
        for f in files:
            size = f.stat().st_size
            if pos + size > len(dest):
                pos = 0
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(dest[pos:pos + size])
            pos += size
    raw()
    t_raw = best_of(raw)
    t_block = best_of(raw_block)
    def fresh_passes(record: str) -> list[list[float]]:
        """Loader passes of freshly opened caches (a new process's first pass), with the verified-file
        record on (the default: these files were recorded when written) or off (every chunk hashed)."""
        saved = os.environ.get("FAST_SAE_VERIFIED_RECORD")
        if record == "off":
            os.environ["FAST_SAE_VERIFIED_RECORD"] = "off"
        try:
            return [loader_pass(ActivationCache.open(path, verify=True), n, block, passes=3) for _ in range(3)]
        finally:
            if saved is None:
                os.environ.pop("FAST_SAE_VERIFIED_RECORD", None)
            else:
                os.environ["FAST_SAE_VERIFIED_RECORD"] = saved

    on = fresh_passes("on")
    hashed = fresh_passes("off")
    t_on = min(p[0] for p in on)  # first pass of a fresh cache: maps every chunk, trusts the recorded ones
    t_hash = min(p[0] for p in hashed)  # first pass hashing every chunk (record off, or a cache not yet verified)
    t_off = min(loader_pass(ActivationCache.open(path, verify=False), n, block)[0] for _ in range(3))
    t_steady = min(t for p in on + hashed for t in p[1:])  # later epochs
    print(f"local (page cache warm), {nbytes / 2**20:.0f} MiB in {len(files)} chunk files, loader blocks of {block} "
          f"tokens:")
    print(f"  raw readinto, one chunk-sized buffer   {nbytes / t_raw / 1e9:6.2f} GB/s")
    print(f"  raw readinto, into the loader's block  {nbytes / t_block / 1e9:6.2f} GB/s")
    print(f"  loader, first pass, verified files trusted  {nbytes / t_on / 1e9:6.2f} GB/s   loader/raw = "
          f"{t_raw / t_on:.2f}, loader/raw-into-block = {t_block / t_on:.2f}  (goal >= 0.9)")
    print(f"  loader, first pass, every chunk hashed      {nbytes / t_hash / 1e9:6.2f} GB/s   loader/raw = "
          f"{t_raw / t_hash:.2f}, loader/raw-into-block = {t_block / t_hash:.2f}")
    print(f"  loader, first pass, verify off              {nbytes / t_off / 1e9:6.2f} GB/s   loader/raw = "
          f"{t_raw / t_off:.2f}, loader/raw-into-block = {t_block / t_off:.2f}")
    print(f"  loader, later epochs                        {nbytes / t_steady / 1e9:6.2f} GB/s   "
          f"loader/raw = {t_raw / t_steady:.2f}, loader/raw-into-block = {t_block / t_steady:.2f}"
          f"  (verified and mapped already)")


def bench_remote(url: str, options: dict[str, str], n: int, block: int, label: str) -> None:
    cache = ActivationCache.open(url, options=options)
    store = open_store(url, options)
    keys = [cache.chunk_key(0, i) for i in range(cache.n_chunks)]
    nbytes = sum(store.list("acts/layer_0").get(k, 0) for k in keys)
    pool = ThreadPoolExecutor(POOL_THREADS)

    def raw() -> None:
        for data in pool.map(store.get, keys):
            assert len(data)
    raw()
    t_raw = best_of(raw)
    t_load = min(loader_pass(ActivationCache.open(url, options=options), n, block)[0] for _ in range(3))
    pool.shutdown()
    print(f"S3 on 127.0.0.1 ({label}), {nbytes / 2**20:.0f} MiB stored in {len(keys)} chunk objects, "
          f"{POOL_THREADS} requests in flight:")
    print(f"  raw GET of the chunks {nbytes / t_raw / 1e6:7.1f} MB/s")
    print(f"  loader (read-ahead)   {nbytes / t_load / 1e6:7.1f} MB/s   loader/raw = {t_raw / t_load:.2f}  "
          f"(goal >= 0.9)")


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its child processes onto ``cpus`` (the server's own threads too)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass
            children = task / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--block", type=int, default=8192, help="tokens per loader read (the trainer's block)")
    ap.add_argument("--only", choices=("checksums", "local", "s3"), help="run one part only")
    ap.add_argument("--pin", action="store_true",
                    help="S3: keep the server off the reader's cores (server on the first CPU, this process on "
                         "the others, set before any thread starts), so loader/raw measures the loader")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, set(cpus[1:]))  # threads started from here on inherit it
    from tests.s3server import start_s3

    if args.only in (None, "checksums"):
        bench_checksums()
    x = np.random.default_rng(1).standard_normal((args.tokens, args.d)).astype(np.float32)
    starts = np.arange(0, args.tokens + 1, 512)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FAST_SAE_VERIFIED_RECORD", str(Path(tmp) / "verified"))  # not the user's home
        local = Path(tmp) / "cache"
        if args.only in (None, "local"):
            write_cache_from_arrays(local, {0: x}, seq_starts=starts, chunk_tokens=args.chunk)
            bench_local(local, args.tokens, args.block)
        if args.only not in (None, "s3"):
            return
        server = start_s3(Path(tmp) / "weed")
        if args.pin:
            pin_tree(server.proc.pid, {cpus[0]})
            print(f"pinned: S3 server (pid {server.proc.pid} and children) on CPU {cpus[0]}, this reader on CPUs "
                  f"{cpus[1:]}")
        os.environ.update(server.env)
        try:
            options = {"endpoint": server.endpoint}
            bucket = server.bucket()
            for compression in ("none", "zstd"):
                url = f"s3://{bucket}/{compression}"
                write_cache_from_arrays(url, {0: x}, seq_starts=starts, chunk_tokens=args.chunk,
                                        compression=compression, options=options)
                bench_remote(url, options, args.tokens, args.block, compression)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
