"""A cache holds only regular files: a chunk replaced by a symlink to /dev/zero, by a FIFO, or by a
symlink to a file outside the cache is refused with one line by `info --verify`, `evaluate` and
`cache copy` (real CLI subprocesses, each under a memory limit and a timeout), and no reader maps or
decodes more than the recorded bytes."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.actcache.integrity import decode_chunk
from tests.evaluate.helpers import save_pca_sae
from tests.helpers import ROOT

MEMORY_LIMIT = 3 << 30  # a reader buffering /dev/zero dies at this limit instead of taking the machine
CHUNK = "acts/layer_2/c/1/0"


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limited, stdin=subprocess.DEVNULL)


def _cache(folder: Path, compression: str = "none") -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    write_cache_from_arrays(folder, {2: x}, seq_starts=np.arange(0, 2001, 100), chunk_tokens=500,
                            compression=compression)
    return folder, x


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(line) == 1, proc.stderr
    for w in words:
        assert w in line[0], line[0]


@pytest.mark.slow  # CLI subprocesses (~5 s each)
@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "outside"])
def test_a_chunk_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    cache, x = _cache(tmp_path / "cache")
    chunk = cache / CHUNK
    if kind == "dev_zero":
        chunk.unlink()
        chunk.symlink_to("/dev/zero")
        words = ["symbolic link", "regular files"]
    elif kind == "fifo":
        chunk.unlink()
        os.mkfifo(chunk)
        words = ["FIFO", "regular files"]
    else:  # the right bytes, but outside the cache
        outside = tmp_path / "elsewhere.bin"
        outside.write_bytes(chunk.read_bytes())
        chunk.unlink()
        chunk.symlink_to(outside)
        words = ["symbolic link"]
    _one_line(_cli("info", str(cache), "--verify"), CHUNK, *words)
    if kind != "dev_zero":
        return
    # the other readers of the chunk: a copy and an evaluation
    _one_line(_cli("cache", "copy", str(cache), str(tmp_path / "copy"), "--no-progress"), CHUNK, *words)
    assert not (tmp_path / "copy" / "zarr.json").exists()
    sae = save_pca_sae(tmp_path / "sae", x[:1000], 2, 4, model_name="synthetic")
    _one_line(_cli("evaluate", "--sae", str(sae), "--eval-cache", str(cache), "--out", str(tmp_path / "ev"),
                   "--no-downstream", "--no-progress", "--eval-range", "10:20"), CHUNK, *words)


def test_a_symlinked_folder_leading_out_of_the_cache_is_refused(tmp_path):
    cache, _ = _cache(tmp_path / "cache")
    layer = cache / "acts" / "layer_2" / "c"
    moved = tmp_path / "moved"
    layer.rename(moved)
    layer.symlink_to(moved)
    with pytest.raises(CacheError, match="symbolic link"):
        ActivationCache.open(cache)


def test_a_chunk_is_mapped_and_read_only_up_to_its_recorded_size(tmp_path):
    cache, x = _cache(tmp_path / "cache")
    chunk = cache / CHUNK
    chunk.write_bytes(chunk.read_bytes() + b"\0" * 4096)  # a longer regular file: refused, not mapped
    with pytest.raises(CacheError, match=f"{CHUNK}: chunk file .* bytes, expected 32000"):
        ActivationCache.open(cache).read(2, 0, 2000)
    c = ActivationCache.open(cache)
    with pytest.raises(CacheError, match="bytes, expected 32000"):
        c.verify_all()
    assert c.store.get(CHUNK, limit=100).__len__() == 101  # at most limit + 1 bytes are read


def test_a_zstd_frame_that_expands_beyond_the_chunk_is_refused(tmp_path):
    from numcodecs import Zstd

    bomb = Zstd(checksum=True).encode(np.zeros(50 << 20, np.uint8).tobytes())  # 50 MiB from a few KiB
    with pytest.raises(CacheError, match="declares 52428800 bytes, expected 32000"):
        decode_chunk(bomb, 500, 16, "float32", "zstd", "chunk", 500)
    good = Zstd(checksum=True).encode(np.ones((500, 16), np.float32).tobytes())
    assert decode_chunk(good, 300, 16, "float32", "zstd", "chunk", 500).shape == (300, 16)
    short = Zstd(checksum=True).encode(np.ones((300, 16), np.float32).tobytes())  # fewer bytes than a chunk
    with pytest.raises(CacheError, match="declares 19200 bytes, expected 32000"):
        decode_chunk(short, 300, 16, "float32", "zstd", "chunk", 500)
