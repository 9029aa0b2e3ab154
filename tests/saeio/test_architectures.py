"""The architecture registry: each inference step on hand-computed values; train uses the same names."""
from __future__ import annotations

import pytest
import torch

from fast_sae.saeio import ARCHITECTURE_NAMES, CheckpointError, get_architecture

PRE = torch.tensor([[-1.0, 0.5, 2.0, 0.2], [3.0, -2.0, 0.1, 1.0]])
THRESHOLD = torch.tensor([0.0, 0.6, 1.0, 0.1])


@pytest.mark.parametrize("name, expected", [
    ("standard", [[0.0, 0.5, 2.0, 0.2], [3.0, 0.0, 0.1, 1.0]]),
    ("jumprelu", [[0.0, 0.0, 2.0, 0.2], [3.0, 0.0, 0.0, 1.0]]),  # kept where pre > threshold
    ("batchtopk", [[0.0, 0.0, 2.0, 0.2], [3.0, 0.0, 0.0, 1.0]]),  # a JumpReLU at inference
    ("topk", [[0.0, 0.5, 2.0, 0.0], [3.0, 0.0, 0.0, 1.0]]),  # the 2 largest per row
])
def test_activation(name, expected):
    arch = get_architecture(name)
    threshold = THRESHOLD if "threshold" in arch.tensors else None
    out = arch.activate(PRE, threshold, 2 if arch.needs_k else None)
    assert torch.equal(out, torch.tensor(expected))


def test_registry_names_and_sae_lens_mapping():
    assert ARCHITECTURE_NAMES == ("standard", "jumprelu", "topk", "batchtopk")
    assert {n: get_architecture(n).sae_lens_name for n in ARCHITECTURE_NAMES} == {
        "standard": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu"}
    with pytest.raises(CheckpointError, match="somewhere: architecture 'gated' is not supported here"):
        get_architecture("gated", "somewhere")


def test_training_knows_exactly_the_registered_architectures():
    from fast_sae.train.config import ARCHITECTURES, SPARSITY_FIELD, ConfigError, GridConfig
    from fast_sae.train.saes import GROUP_CLASSES

    assert tuple(GROUP_CLASSES) == ARCHITECTURES == ARCHITECTURE_NAMES
    assert set(SPARSITY_FIELD) == set(ARCHITECTURE_NAMES)
    for name, cls in GROUP_CLASSES.items():
        assert cls.architecture == name and cls.has_threshold == ("threshold" in get_architecture(name).tensors)
    with pytest.raises(ConfigError, match="expected one of standard, jumprelu, topk, batchtopk"):
        GridConfig(layers=[0], architectures=["gated"], expansion_factors=[1]).specs()
