"""Checkpoint fields are parsed strictly: ASCII digits only in hook names, a known dtype and a well
formed device, k within the SAE's width; each refusal is one line naming the file and the field."""
from __future__ import annotations

import pytest

from fast_sae.saeio import CheckpointError, from_cfg_json
from fast_sae.saeio.schema import layer_of_hook


def _flat(**extra):
    return {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 4, "hook_name": "blocks.3.hook_resid_post", **extra}


def test_hook_names_take_ascii_digits_only():
    assert layer_of_hook("blocks.3.hook_resid_post") == 3 and layer_of_hook("blocks.12.hook_resid_post") == 12
    for name in ("blocks.\u0663.hook_resid_post", "blocks.\uff13.hook_resid_post", "blocks.03.hook_resid_post",
                 "blocks.3 .hook_resid_post"):
        assert layer_of_hook(name) is None, name
        with pytest.raises(CheckpointError, match="cfg.json: hook_name .* cannot be scored"):
            from_cfg_json(_flat(hook_name=name), "cfg.json")


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "float1024", "field 'dtype' = 'float1024', expected one of"),
    ("dtype", 32, "field 'dtype' = 32"),
    ("device", "cuda:\u0663", "field 'device' = 'cuda:\u0663', expected cpu, cuda, cuda:N"),
    ("device", "gpu0", "field 'device' = 'gpu0'"),
    ("device", "cuda:99999", "field 'device' = 'cuda:99999'"),
    ("k", 17, "field 'k' = 17, expected 1..d_sae \\(16\\)"),
])
def test_unknown_or_malformed_fields_are_refused(field, value, message):
    with pytest.raises(CheckpointError, match=f"cfg.json: {message}"):
        from_cfg_json(_flat(**{field: value}), "cfg.json")


def test_known_dtype_and_device_are_accepted_and_not_acted_on():
    for dtype, device in (("float32", "cpu"), ("torch.bfloat16", "cuda"), ("float16", "cuda:7"), ("float64", "mps")):
        cfg = from_cfg_json(_flat(dtype=dtype, device=device), "cfg.json")
        assert cfg.k == 4 and cfg.layer == 3
