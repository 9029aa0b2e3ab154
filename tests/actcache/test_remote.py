"""Caches in a real S3 store (SeaweedFS on 127.0.0.1): same bytes as on disk, same reads, `cache copy`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.actcache.store import open_store
from tests.helpers import ROOT, run_cli
from tests.s3server import SECRET_KEY

pytestmark = pytest.mark.slow  # a real S3 server starts (~15 s) and real subprocesses run


def _arrays(n: int = 5000, d: int = 24, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {2: rng.standard_normal((n, d)).astype(np.float32), 5: (3 * rng.standard_normal((n, d))).astype(np.float32)}


def _contents(where, options=None) -> dict[str, bytes]:
    store = open_store(where, options)
    return {k: bytes(store.get(k)) for k in sorted(store.list())}


@pytest.fixture
def bucket_url(s3):
    return f"s3://{s3.bucket()}/caches/one", {"endpoint": s3.endpoint}


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_remote_cache_is_byte_identical_to_local(s3, tmp_path, compression):
    url = f"s3://{s3.bucket()}/c"
    options = {"endpoint": s3.endpoint}
    acts = _arrays()
    starts = np.array([0, 700, 2000, 3100, 5000])
    write_cache_from_arrays(tmp_path / "local", acts, seq_starts=starts, chunk_tokens=1024, compression=compression)
    write_cache_from_arrays(url, acts, seq_starts=starts, chunk_tokens=1024, compression=compression, options=options)
    local, remote = _contents(tmp_path / "local"), _contents(url, options)
    assert local.keys() == remote.keys()
    assert [k for k in local if local[k] != remote[k]] == []
    assert any(k.startswith("acts/layer_5/c/4/") for k in remote) and "commits/4.json" in remote
    cache = ActivationCache.open(url, options=options)
    assert not cache.memmappable and cache.complete
    assert np.array_equal(cache.read(5, 900, 4321), acts[5][900:4321])
    got = np.concatenate([rows for _, rows in cache.iter_chunks(2)])
    assert np.array_equal(got, acts[2])
    assert cache.layer_stats(5).mean_sq_norm == ActivationCache.open(tmp_path / "local").layer_stats(5).mean_sq_norm
    assert all(SECRET_KEY.encode() not in v for v in remote.values())


def test_endpoint_from_the_environment_and_bad_credentials(s3, tmp_path, monkeypatch):
    url = f"s3://{s3.bucket()}/env"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    write_cache_from_arrays(url, _arrays(n=600), chunk_tokens=256, options={})
    assert ActivationCache.open(url, options={}).n_tokens == 600
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(CacheError, match="access denied by the store; check the credentials") as info:
        ActivationCache.open(url, options={"region": "us-east-1"})  # new options: a new client, new env
    assert "wrong-secret-value" not in str(info.value) and "\n" not in str(info.value)


def test_info_reads_a_remote_cache_and_keeps_secrets_out(s3, tmp_path):
    url = f"s3://{s3.bucket()}/info"
    write_cache_from_arrays(url, _arrays(n=800), chunk_tokens=256, options={"endpoint": s3.endpoint})
    out = run_cli("info", url, "--verify", "--storage-option", f"endpoint={s3.endpoint}")
    assert "[complete]  format 2" in out.stdout and "verified" in out.stdout
    assert SECRET_KEY not in out.stdout + out.stderr
    missing = run_cli("info", url + "-nothing", "--storage-option", f"endpoint={s3.endpoint}", check=False)
    assert missing.returncode != 0 and "is not a zarr v3 activation cache" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_copy_both_ways_and_resume_after_interruption(s3, tmp_path):
    options = {"endpoint": s3.endpoint}
    src = tmp_path / "src"
    acts = _arrays(n=40000, d=64)
    write_cache_from_arrays(src, acts, seq_starts=np.arange(0, 40001, 400), chunk_tokens=256)
    url = f"s3://{s3.bucket()}/copied"
    flags = ["--storage-option", f"endpoint={s3.endpoint}", "--no-progress"]
    # an interrupted upload: killed once some chunks are there; not a cache until finished
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "cache", "copy", str(src), url, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = open_store(url, options)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(store.list("acts")) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "the copy finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.exists("zarr.json")
    with pytest.raises(CacheError, match="not a zarr v3 activation cache"):
        ActivationCache.open(url, options=options)
    out = run_cli("cache", "copy", str(src), url, *flags)
    assert "already there and verified" in out.stdout
    assert _contents(src) == _contents(url, options)
    # and back down to a local folder
    back = tmp_path / "back"
    run_cli("cache", "copy", url, str(back), *flags)
    assert _contents(back) == _contents(src)
    assert np.array_equal(ActivationCache.open(back).read(2, 0, 40000), acts[2])


def test_copy_refuses_an_incomplete_or_damaged_source(s3, tmp_path):
    src = tmp_path / "src"
    write_cache_from_arrays(src, _arrays(n=3000), chunk_tokens=512)
    url = f"s3://{s3.bucket()}/bad"
    flags = ["--storage-option", f"endpoint={s3.endpoint}", "--no-progress"]
    chunk = src / "acts" / "layer_5" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    bad = run_cli("cache", "copy", str(src), url, *flags, check=False)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr and "acts/layer_5/c/2/0" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not open_store(url, {"endpoint": s3.endpoint}).exists("zarr.json")
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    (src / "commits" / "3.json").unlink()
    doc = (src / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    (src / "zarr.json").write_text(doc)
    incomplete = run_cli("cache", "copy", str(src), url, *flags, check=False)
    assert incomplete.returncode == 1 and "harvest not finished" in incomplete.stderr


def test_path_objects_of_urls_are_read_back_as_urls(s3):
    url = f"s3://{s3.bucket()}/p"
    write_cache_from_arrays(url, _arrays(n=300), chunk_tokens=128, options={"endpoint": s3.endpoint})
    cache = ActivationCache.open(Path(url), options={"endpoint": s3.endpoint})  # pathlib makes it "s3:/..."
    assert str(cache.path) == url and cache.path == Path(url)
