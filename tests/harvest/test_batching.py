
import numpy as np
import pytest
import torch

from fast_sae.harvest.batching import plan_batches
from fast_sae.harvest.engine import HFEngine


def test_plan_covers_the_stream_contiguously():
    starts = np.concatenate([[0], np.cumsum([5, 9, 3, 16, 2, 2, 7, 40, 1])])
    batches = plan_batches(starts, row_tokens=16, batch_tokens=32)
    assert batches[0].start == 0 and batches[-1].end == starts[-1]
    for a, b in zip(batches, batches[1:]):
        assert a.end == b.start
    for b in batches:
        flat = [r for row in b.rows for r in row]
        assert sum(e - s for s, e in flat) == b.n_tokens
        assert all(sum(e - s for s, e in row) <= 16 or len(row) == 1 for row in b.rows)
        assert len(b.rows) * max(r[-1][1] - r[0][0] for r in b.rows) <= 32 or len(b.rows) == 1


@pytest.mark.slow
def test_packed_batch_equals_each_sequence_alone(embedded_model):
    model, tok = embedded_model
    rng = np.random.default_rng(0)
    lengths = [7, 19, 4, 11, 23, 3]
    ids = rng.integers(20, 40000, size=sum(lengths)).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    engine = HFEngine(model, [1, 4], "float32", pad_id=tok.pad_token_id)
    try:
        batches = plan_batches(starts, row_tokens=32, batch_tokens=64)
        assert any(len(row) > 1 for b in batches for row in b.rows)  # really packed
        got = {1: [], 4: []}
        for b in batches:
            out = engine.run(b, ids)
            for layer in got:
                got[layer].append(out[layer])
    finally:
        engine.close()
    for layer in got:
        packed = np.concatenate(got[layer])
        for s, e in zip(starts[:-1], starts[1:]):
            with torch.no_grad():
                hs = model(torch.tensor(ids[s:e][None].astype(np.int64)), output_hidden_states=True).hidden_states
            alone = hs[layer + 1][0].numpy()
            # float32 on CPU: differences come from summation order only (~1e-4 on values up to ~800)
            np.testing.assert_allclose(packed[s:e], alone, atol=2e-3, rtol=1e-4)
