"""What `harvest --backend vllm|auto` says when it cannot use vLLM: one line, before any cache is written."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fast_sae.lm import embedded_model_dir
from tests.harvest.vllm_support import VLLM_VENV, last_line, run_vllm_cli, vllm_env, vllm_python
from tests.helpers import run_cli

SMALL = ["--max-tokens", "300", "--context-size", "128", "--layers", "0,1"]


def test_the_vllm_venv_exists_and_has_vllm() -> None:
    """Part of the install (setup.sh runs setup_vllm.sh): missing, this fails and says how to make it."""
    py = vllm_python()
    proc = subprocess.run([str(py), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') "
                           "is None or importlib.util.find_spec('fast_sae') is None)"],
                          capture_output=True, text=True, timeout=60, env=vllm_env())
    assert proc.returncode == 0, f"{VLLM_VENV} lacks vllm or fast_sae; rerun ./setup_vllm.sh"


@pytest.mark.slow
def test_vllm_not_installed_in_this_python(tmp_path) -> None:
    proc = run_cli("harvest", "--out", str(tmp_path / "c"), "--backend", "vllm", *SMALL, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith("Error: --backend vllm: vLLM is not installed in this Python") and "setup_vllm.sh" in line
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A real (random) GPT-2 checkpoint with the embedded model's tokenizer and chat template: an
    architecture vLLM runs but whose layers the capture does not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=49152)
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    for f in embedded_model_dir().iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


@pytest.mark.slow
def test_unsupported_model(tiny_gpt2, tmp_path) -> None:
    proc = run_vllm_cli("harvest", "--out", str(tmp_path / "c"), "--backend", "vllm", "--model", str(tiny_gpt2),
                        *SMALL, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc) == ("Error: --backend vllm: architecture GPT2LMHeadModel is not supported by the vLLM "
                               "engine (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                               "Qwen3ForCausalLM); use --backend hf")
    assert not (tmp_path / "c").exists()
    # auto falls back to transformers, and says so
    out = run_vllm_cli("harvest", "--out", str(tmp_path / "auto"), "--backend", "auto", "--model", str(tiny_gpt2),
                       *SMALL)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["engine"].startswith("hf (auto: architecture GPT2LMHeadModel is not supported")


@pytest.mark.slow
def test_prefix_caching_forced_on(tmp_path) -> None:
    proc = run_vllm_cli("harvest", "--out", str(tmp_path / "c"), "--backend", "vllm", *SMALL,
                        "--vllm-args", '{"enable_prefix_caching": true}', check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("Error: --vllm-args: enable_prefix_caching must stay false")
    assert not (tmp_path / "c").exists()
