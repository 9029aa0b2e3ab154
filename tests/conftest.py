"""Shared, session-scoped fixtures: the embedded model is loaded and small caches harvested once.

The caches are real: SmolLM2-135M-Instruct (embedded) over the embedded chat/text data, through
the same run_harvest the CLI calls. Layers [2, 5], a few thousand tokens, small chunks so that
several chunk files exist.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

CACHE_LAYERS = [2, 5]

# Harvests in this Python stay in this Python (transformers) unless a test asks for the project's vLLM
# venv; the tests of the dispatch to it set FAST_SAE_VLLM_VENV themselves.
os.environ.setdefault("FAST_SAE_VLLM_VENV", "off")
# Records of verified chunk files (fast_sae/actcache/trusted.py) of the tests' temporary caches go to a
# folder of this session, not to the user's $FAST_SAE_HOME.
os.environ.setdefault("FAST_SAE_VERIFIED_RECORD", tempfile.mkdtemp(prefix="fast-sae-verified-"))


@pytest.fixture(scope="session")
def embedded_model():
    from fast_sae.lm import EMBEDDED_MODEL, load_model, load_tokenizer

    return load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)


def _harvest(path: Path, **kw) -> Path:
    from fast_sae.harvest.run import HarvestConfig, run_harvest

    run_harvest(HarvestConfig(out=path, layers=list(CACHE_LAYERS), chunk_tokens=512, batch_tokens=2048, **kw),
                log=lambda *_: None)
    return path


@pytest.fixture(scope="session")
def fast_cache(tmp_path_factory, embedded_model) -> Path:
    return _harvest(tmp_path_factory.mktemp("caches") / "fast", regime="fast", max_tokens=3000, context_size=256)


@pytest.fixture(scope="session")
def btp_cache(tmp_path_factory, embedded_model) -> Path:
    return _harvest(tmp_path_factory.mktemp("caches") / "btp", regime="bt-p", max_tokens=2048, context_size=128)


@pytest.fixture(scope="session")
def btf_cache(tmp_path_factory, embedded_model) -> Path:
    return _harvest(tmp_path_factory.mktemp("caches") / "btf", regime="bt-f", max_tokens=2048, context_size=128)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session; its credentials are in the environment
    (as a user's would be), the endpoint is given per test (--storage-option or AWS_ENDPOINT_URL)."""
    from tests.s3server import start_s3

    server = start_s3(tmp_path_factory.mktemp("weed"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
