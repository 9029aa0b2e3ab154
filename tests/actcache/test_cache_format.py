"""The cache format as documented in cache_layout.md: plain chunk files, zstd alternative, refusals."""
import json

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays


def _acts(n=1000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return {1: rng.standard_normal((n, d)).astype(np.float32), 4: rng.standard_normal((n, d)).astype(np.float32)}


@pytest.mark.slow
def test_chunk_files_are_plain_little_endian_arrays(tmp_path):
    acts = _acts()
    write_cache_from_arrays(tmp_path / "c", acts, seq_starts=[0, 300, 1000], chunk_tokens=256)
    c = ActivationCache.open(tmp_path / "c")
    assert c.n_chunks == 4
    for i in range(4):
        f = tmp_path / "c" / "acts" / "layer_4" / "c" / str(i) / "0"
        raw = np.fromfile(f, dtype="<f4").reshape(256, 16)  # the last chunk is full size, zero padded
        rows = min(256, 1000 - i * 256)
        assert np.array_equal(raw[:rows], acts[4][i * 256:i * 256 + rows])
        assert np.all(raw[rows:] == 0)
    assert np.array_equal(c.read(1, 200, 700), acts[1][200:700])
    meta = json.loads((tmp_path / "c" / "acts" / "layer_1" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes"]


@pytest.mark.slow
def test_zstd_cache_reads_the_same(tmp_path):
    acts = _acts()
    write_cache_from_arrays(tmp_path / "z", acts, chunk_tokens=256, compression="zstd")
    c = ActivationCache.open(tmp_path / "z")
    assert not c.memmappable
    assert np.array_equal(c.read(4, 0, 1000), acts[4])
    with pytest.raises(CacheError, match="cannot be memory-mapped"):
        c.memmap_chunk(4, 0)


def test_refusals(tmp_path):
    write_cache_from_arrays(tmp_path / "c", _acts(), chunk_tokens=256)
    c = ActivationCache.open(tmp_path / "c")
    with pytest.raises(CacheError, match=r"layer 2 not in cache \(layers: \[1, 4\]\)"):
        c.read(2, 0, 1)
    doc = json.loads((tmp_path / "c" / "zarr.json").read_text())
    doc["attributes"]["complete"] = False
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="harvest not finished"):
        ActivationCache.open(tmp_path / "c")
    doc["attributes"]["format_version"] = 99
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="format_version 99"):
        ActivationCache.open(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(CacheError, match="not a zarr v3 activation cache"):
        ActivationCache.open(tmp_path / "d")


def test_all_zero_chunks_are_still_written(tmp_path):
    acts = {1: np.zeros((600, 8), np.float32)}
    write_cache_from_arrays(tmp_path / "c", acts, chunk_tokens=256)
    c = ActivationCache.open(tmp_path / "c")
    assert all(c.chunk_file(1, i).stat().st_size == 256 * 8 * 4 for i in range(3))
    assert np.array_equal(c.read(1, 0, 600), acts[1])
