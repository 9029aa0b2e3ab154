"""Shared fixtures of the train tests: small synthetic caches with a known sparse dictionary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fast_sae.actcache.from_arrays import write_cache_from_arrays

torch.set_num_threads(1)  # tests share a 2-core machine; one thread is also the least noisy


def sparse_dictionary_data(n: int, d: int, m: int, p: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x = codes @ D with unit-norm ground-truth features D [m, d] and ~p*m active per token."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((m, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = (rng.random((n, m)) < p) * rng.uniform(0.5, 2.0, (n, m))
    return (codes @ dictionary).astype(np.float32), dictionary


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """60k tokens of a 32-feature dictionary in d=32, sequences of 100 tokens, chunk 8192."""
    x, dictionary = sparse_dictionary_data(60000, 32, 32, 0.08)
    path = tmp_path_factory.mktemp("syn") / "cache"
    write_cache_from_arrays(path, {0: x}, seq_starts=np.arange(0, len(x) + 1, 100), chunk_tokens=8192)
    return path, dictionary


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers (3 and 7), d=16, 6000 tokens with varied sequence lengths, scaled differently per layer."""
    rng = np.random.default_rng(1)
    x, _ = sparse_dictionary_data(6000, 16, 24, 0.1, seed=1)
    lengths = rng.integers(20, 80, size=200)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = starts[starts < 6000]
    starts = np.append(starts, 6000)
    path = tmp_path_factory.mktemp("small") / "cache"
    write_cache_from_arrays(path, {3: x * 5 + 1, 7: x * 0.2}, seq_starts=starts, chunk_tokens=1000)
    return path
