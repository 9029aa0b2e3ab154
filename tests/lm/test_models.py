import pytest
import torch

from fast_sae.lm import block_hidden, map_block_output


def test_map_block_output_handles_tensor_and_tuple():
    h = torch.ones(1, 3, 2)
    assert torch.equal(map_block_output(h, lambda t: t * 2), h * 2)
    out = map_block_output((h, "past"), lambda t: t * 0)
    assert isinstance(out, tuple) and out[1] == "past" and torch.equal(out[0], torch.zeros_like(h))
    with pytest.raises(TypeError):
        map_block_output({"h": h}, lambda t: t)
    assert block_hidden((h, "past")) is h and block_hidden(h) is h
