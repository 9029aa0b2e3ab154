"""Batch orders: FAST mixing buffer, in order, random; all deterministic and resumable by step."""
from __future__ import annotations

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache
from fast_sae.train.buffer import BatchOrder, mixing_half
from fast_sae.train.loader import DataSplit, LayerReader, TokenStream


def _order(cache_path, order: str, seed: int = 0, b: int = 50, buffer_tokens: int = 1000, eval_sequences: int = 10):
    cache = ActivationCache.open(cache_path)
    split = DataSplit.from_cache(cache, eval_sequences)
    stream = TokenStream({7: LayerReader(cache, 7, 1.0)}, split.train_tokens)
    return BatchOrder(order, stream, b, buffer_tokens, seed, block_tokens=300), cache, split


def _collect(order: BatchOrder, start: int, total: int):
    steps = {}
    for block in order.blocks(start, total):
        for i in range(block.n_steps):
            steps[block.first_step + i] = (block.token_index[i * order.b:(i + 1) * order.b],
                                          block.acts[7][i * order.b:(i + 1) * order.b].numpy())
    return steps


def test_mixing_buffer_follows_the_fast_producer_consumer_scheme(small_cache):
    order, cache, split = _order(small_cache, "mixing")
    raw = cache.read(7, 0, cache.n_tokens)
    h = mixing_half(1000, 50)
    steps = _collect(order, 0, 40)  # 4 cycles of 10 batches
    assert sorted(steps) == list(range(40))
    for idx, acts in steps.values():
        assert np.array_equal(acts, raw[idx])  # rows are the activations of the recorded tokens
    served = np.concatenate([steps[s][0] for s in range(40)])
    assert len(np.unique(served)) == len(served)  # no token served twice within the first pass
    # Cycle 0 serves from the first 2H tokens only; each later cycle can reach H further.
    for c in range(4):
        cyc = np.concatenate([steps[s][0] for s in range(c * 10, c * 10 + 10)])
        assert cyc.max() < (c + 2) * h
    assert not np.array_equal(np.sort(served[:h]), np.arange(h))  # shuffled, not in cache order
    assert all(i < split.train_tokens for i in served)


def test_orders_are_deterministic_by_seed_and_resumable_at_any_step(small_cache):
    for name in ("mixing", "random", "sequential"):
        a = _collect(_order(small_cache, name, seed=3)[0], 0, 57)
        b = _collect(_order(small_cache, name, seed=3)[0], 0, 57)
        resumed = _collect(_order(small_cache, name, seed=3)[0], 23, 57)
        assert sorted(resumed) == list(range(23, 57))
        for s in range(57):
            assert np.array_equal(a[s][0], b[s][0])
        for s in range(23, 57):
            assert np.array_equal(a[s][0], resumed[s][0]), (name, s)
            assert np.array_equal(a[s][1], resumed[s][1]), (name, s)
        if name != "sequential":
            other = _collect(_order(small_cache, name, seed=4)[0], 0, 57)
            assert not np.array_equal(a[0][0], other[0][0])


def test_sequential_is_cache_order_and_random_is_a_permutation_per_epoch(small_cache):
    order, cache, split = _order(small_cache, "sequential")
    steps = _collect(order, 0, 5)
    assert np.concatenate([steps[s][0] for s in range(5)]).tolist() == list(range(250))
    order, cache, split = _order(small_cache, "random", b=100)
    per_epoch = split.train_tokens // 100
    steps = _collect(order, 0, per_epoch)
    seen = np.concatenate([steps[s][0] for s in range(per_epoch)])
    assert len(np.unique(seen)) == len(seen) == per_epoch * 100
    assert seen.max() < split.train_tokens


@pytest.mark.parametrize("buffer_tokens,expected", [(1000, 500), (1010, 500), (60, 50), (10, 50)])
def test_mixing_half_is_whole_batches(buffer_tokens, expected):
    assert mixing_half(buffer_tokens, 50) == expected
