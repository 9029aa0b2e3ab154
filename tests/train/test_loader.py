"""The loader returns exactly the cached rows (scaled), reads compressed caches, and fails clearly."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.train.loader import DataSplit, LayerReader, Prefetcher, TokenStream


def test_read_and_gather_match_the_cache(small_cache):
    cache = ActivationCache.open(small_cache)
    reader = LayerReader(cache, 3, 0.5)
    raw = cache.read(3, 0, cache.n_tokens)
    assert np.array_equal(reader.read(950, 2100), raw[950:2100] * np.float32(0.5))
    idx = np.array([5999, 0, 1000, 999, 4321, 1000])
    assert np.array_equal(reader.gather(idx), raw[idx] * np.float32(0.5))


def test_stream_wraps_around_the_training_tokens(small_cache):
    cache = ActivationCache.open(small_cache)
    split = DataSplit.from_cache(cache, 10)
    stream = TokenStream({7: LayerReader(cache, 7, 1.0)}, split.train_tokens)
    n = split.train_tokens
    got = stream.read(n - 5, 12)[7]
    raw = cache.read(7, 0, n)
    assert np.array_equal(got, np.concatenate([raw[n - 5:], raw[:7]]))
    assert stream.indices(n - 1, 2).tolist() == [n - 1, 0]


def test_split_holds_out_whole_final_sequences(small_cache):
    cache = ActivationCache.open(small_cache)
    starts = cache.seq_starts()
    split = DataSplit.from_cache(cache, 10)
    assert split.train_tokens == starts[-11]
    assert split.eval_range == (int(starts[-11]), cache.n_tokens)
    assert split.to_json()["eval_sequence_range"] == [len(starts) - 11, len(starts) - 1]
    with pytest.raises(CacheError, match="cannot hold out"):
        DataSplit.from_cache(cache, len(starts))


def test_zstd_cache_reads_through_zarr(tmp_path):
    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    path = write_cache_from_arrays(tmp_path / "z", {0: x}, chunk_tokens=512, compression="zstd")
    cache = ActivationCache.open(path)
    assert not cache.memmappable
    reader = LayerReader(cache, 0, 2.0)
    assert np.array_equal(reader.read(100, 2900), x[100:2900] * 2)
    assert np.array_equal(reader.gather(np.array([2999, 3])), x[[2999, 3]] * 2)


def test_truncated_chunk_is_one_clear_error(tmp_path):
    x = np.ones((2048, 4), np.float32)
    path = write_cache_from_arrays(tmp_path / "t", {0: x}, chunk_tokens=512)
    cache = ActivationCache.open(path)
    f = cache.chunk_file(0, 2)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    reader = LayerReader(cache, 0, 1.0)
    reader.read(0, 1024)
    with pytest.raises(CacheError, match=r"c/2/0: chunk file .* bytes, expected"):
        reader.read(1000, 1100)


def test_non_finite_activations_are_reported_with_their_token(tmp_path):
    x = np.ones((1024, 4), np.float32)
    path = write_cache_from_arrays(tmp_path / "n", {0: x}, chunk_tokens=512)  # the writer refuses NaN itself
    chunk = np.fromfile(path / "acts" / "layer_0" / "c" / "1" / "0", "<f4")
    chunk[(700 - 512) * 4 + 2] = np.nan  # a damaged file, read with checksums off: finiteness still holds
    chunk.tofile(path / "acts" / "layer_0" / "c" / "1" / "0")
    reader = LayerReader(ActivationCache.open(path, verify=False), 0, 1.0)
    with pytest.raises(CacheError, match="non-finite activations .*token 700"):
        reader.read(512, 1024)
    with pytest.raises(CacheError, match="token 700"):
        reader.gather(np.array([3, 700]))


def test_prefetcher_yields_in_order_and_reraises_errors():
    assert list(Prefetcher(lambda: iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise CacheError("boom")

    it = Prefetcher(broken)
    assert next(it) == 1
    with pytest.raises(CacheError, match="boom"):
        next(it)
