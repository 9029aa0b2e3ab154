"""A checkpoint truncated to blocks 0..n-1 computes exactly the full model's first n block outputs."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fast_sae.lm import ModelLoadError, truncated_checkpoint


@pytest.fixture()
def tiny_llama(tmp_path, monkeypatch):
    monkeypatch.setenv("FAST_SAE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(str(path), max_shard_size="40KB")  # several shards + an index, like big checkpoints
    (path / "tokenizer_config.json").write_text("{}")
    return model, path


def test_truncated_copy_equals_the_full_models_blocks(tiny_llama) -> None:
    model, path = tiny_llama
    assert (path / "model.safetensors.index.json").is_file()
    out = truncated_checkpoint(str(path), None, 3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and (out / "tokenizer_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in index if ".layers.3." in k or ".layers.5." in k]
    assert all((out / f).is_file() for f in set(index.values()))
    small = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        part = small(ids, output_hidden_states=True).hidden_states
    for layer in range(2):  # blocks below the last kept one (the last gets transformers' final norm)
        torch.testing.assert_close(part[layer + 1], full[layer + 1], rtol=0, atol=0)
    assert truncated_checkpoint(str(path), None, 3) == out  # made once, then reused
    assert truncated_checkpoint(str(path), None, 4) != out
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_more_blocks_than_the_model_has(tiny_llama) -> None:
    _, path = tiny_llama
    with pytest.raises(ModelLoadError, match="num_hidden_layers is 6, cannot keep 7"):
        truncated_checkpoint(str(path), None, 7)
