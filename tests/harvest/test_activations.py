"""Cached activations are the model's residual stream after block L = hidden_states[L + 1]."""
import numpy as np
import pytest
import torch

from fast_sae.actcache import ActivationCache


@pytest.mark.slow
def test_cache_equals_output_hidden_states(fast_cache, embedded_model):
    model, _ = embedded_model
    c = ActivationCache.open(fast_cache)
    starts, ids = c.seq_starts(), c.token_ids()
    for s in (0, c.meta.n_sequences // 2, c.meta.n_sequences - 1):
        a, b = starts[s], starts[s + 1]
        with torch.no_grad():
            hs = model(torch.tensor(ids[a:b][None].astype(np.int64)), output_hidden_states=True).hidden_states
        for layer in c.layers:
            ref = hs[layer + 1][0].numpy()
            got = c.read(layer, a, b)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
            # and not the neighbouring layer (the classic off-by-one)
            assert not np.allclose(got, hs[layer][0].numpy(), rtol=1e-2, atol=1e-1)


def test_stats_match_the_data(fast_cache):
    c = ActivationCache.open(fast_cache)
    for layer in c.layers:
        x = c.read(layer, 0, c.n_tokens).astype(np.float64)
        st = c.layer_stats(layer)
        np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.mean_sq_norm, (x ** 2).sum(1).mean(), rtol=1e-9)
        np.testing.assert_allclose(st.mean_sq_centered, ((x - x.mean(0)) ** 2).sum(1).mean(), rtol=1e-6)
