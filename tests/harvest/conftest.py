"""Caches made by the vLLM engine, once per session, shared by the vLLM tests (each run starts vLLM: ~20 s)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harvest.vllm_support import BTF_ARGS, FAST_ARGS, run_vllm_cli


def _harvest(path: Path, *args: str) -> tuple[Path, dict]:
    proc = run_vllm_cli("harvest", "--out", str(path), *args)
    return path, json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="session")
def vllm_fast(tmp_path_factory) -> tuple[Path, dict]:
    """FAST regime, --backend vllm: (cache, CLI summary)."""
    return _harvest(tmp_path_factory.mktemp("vllm") / "fast", "--backend", "vllm", *FAST_ARGS)


@pytest.fixture(scope="session")
def vllm_btf(tmp_path_factory) -> tuple[Path, dict]:
    """BT(F) regime, --backend auto (which must pick vLLM in its venv): (cache, CLI summary)."""
    return _harvest(tmp_path_factory.mktemp("vllm") / "btf", "--backend", "auto", *BTF_ARGS)
