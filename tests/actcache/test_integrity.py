"""Nothing silently wrong: checksums, finiteness, open-time validation, clean errors, leftovers."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.train.loader import LayerReader
from tests.helpers import run_cli


def _acts(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return {1: rng.standard_normal((n, d)).astype(np.float32), 4: rng.standard_normal((n, d)).astype(np.float32)}


def _cache(tmp_path, name="c", **kw) -> Path:
    return Path(write_cache_from_arrays(tmp_path / name, _acts(), seq_starts=[0, 1000, 2965, 3000],
                                        chunk_tokens=512, **kw))


def _error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error:"), proc.stderr
    return lines[-1]


def _flip(f: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(f.read_bytes())
    data[offset] ^= mask
    f.write_bytes(bytes(data))


@pytest.mark.slow
def test_commit_records_and_index_match_the_files(tmp_path):
    path = _cache(tmp_path)
    cache = ActivationCache.open(path)
    from fast_sae.actcache.integrity import checksum_int

    for i in range(cache.n_chunks):
        rec = json.loads((path / "commits" / f"{i}.json").read_text())
        assert rec["chunk"] == i and rec["rows"] == cache.chunk_rows(i)
        for layer in (1, 4):
            f = cache.chunk_file(layer, i)
            nbytes, digest = cache.expected(layer, i)
            assert Path(f).stat().st_size == nbytes and checksum_int(Path(f).read_bytes()) == digest
            assert rec["files"][f"acts/layer_{layer}/c/{i}/0"][0] == nbytes


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_flipped_bit_is_caught_on_read(tmp_path, compression):
    path = _cache(tmp_path, compression=compression)
    _flip(path / "acts" / "layer_4" / "c" / "2" / "0", 200, 0x10)
    cache = ActivationCache.open(path)
    assert np.array_equal(cache.read(4, 0, 1024), _acts()[4][:1024])  # other chunks are fine
    with pytest.raises(CacheError, match=r"acts/layer_4/c/2/0: checksum mismatch"):
        cache.read(4, 1000, 1100)
    reader = LayerReader(ActivationCache.open(path), 4, 1.0)
    with pytest.raises(CacheError, match="checksum mismatch"):
        reader.read(1024, 1536)
    line = _error_line(run_cli("info", str(path), "--verify", "--json", check=False))
    assert "acts/layer_4/c/2/0" in line and "checksum mismatch" in line


def test_zstd_frames_carry_their_content_checksum(tmp_path):
    path = _cache(tmp_path, compression="zstd")
    meta = json.loads((path / "acts" / "layer_1" / "zarr.json").read_text())
    zstd = [c for c in meta["codecs"] if c["name"] == "zstd"][0]
    assert zstd["configuration"]["checksum"] is True
    raw = (path / "acts" / "layer_1" / "c" / "0" / "0").read_bytes()
    assert raw[4] & 0x04  # frame header descriptor: content checksum flag


def test_non_finite_activations_are_refused_at_write_and_at_read(tmp_path):
    acts = _acts()
    acts[1][700, 3] = np.nan
    with pytest.raises(CacheError, match="layer 1 activation of token 700 is not finite"):
        write_cache_from_arrays(tmp_path / "nan", acts, chunk_tokens=512)
    path = _cache(tmp_path)
    f = path / "acts" / "layer_1" / "c" / "1" / "0"
    data = np.fromfile(f, "<f4")
    data[5 * 16 + 2] = np.inf  # token 512 + 5
    data.tofile(f)
    cache = ActivationCache.open(path, verify=False)  # even with checksums off, finiteness is checked
    with pytest.raises(CacheError, match=r"non-finite activations \(token 517\)"):
        cache.read(1, 500, 600)
    with pytest.raises(CacheError, match="token 517"):
        list(cache.iter_chunks(1))
    with pytest.raises(CacheError, match="token 517"):
        LayerReader(cache, 1, 2.0).gather(np.array([3, 517, 9]))


def _edit_attrs(path: Path, **changes) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"].update(changes)
    (path / "zarr.json").write_text(json.dumps(doc))


def test_attributes_are_validated_against_the_arrays(tmp_path):
    path = _cache(tmp_path)
    _edit_attrs(path, n_tokens=5000)
    with pytest.raises(CacheError, match=r"tokens/ids/zarr.json: shape is \[3000\], the cache's attributes say "
                                         r"\[5000\]"):
        ActivationCache.open(path)
    _edit_attrs(path, n_tokens=3000, n_sequences=4)
    with pytest.raises(CacheError, match=r"sequences/starts/zarr.json: shape is \[4\]"):
        ActivationCache.open(path)
    _edit_attrs(path, n_sequences=3, dtype="float16")
    with pytest.raises(CacheError, match=r"acts/layer_1/zarr.json: data_type is 'float32'.*'float16'"):
        ActivationCache.open(path)
    _edit_attrs(path, dtype="float32", chunk_tokens=256)
    with pytest.raises(CacheError, match=r"acts/layer_1/zarr.json: chunk_shape"):
        ActivationCache.open(path)
    _edit_attrs(path, chunk_tokens=512, d_model="16")
    with pytest.raises(CacheError, match="attribute d_model is '16', expected int"):
        ActivationCache.open(path)
    _edit_attrs(path, d_model=16)
    ActivationCache.open(path)


def test_non_monotonic_sequence_starts_are_refused(tmp_path):
    acts = _acts()
    path = write_cache_from_arrays(tmp_path / "c", acts, seq_starts=[0, 1000, 2965, 3000], chunk_tokens=512)
    import zarr

    z = zarr.open_array(Path(path) / "sequences" / "starts", mode="r+")
    z[:] = np.array([0, 2000, 1500, 3000])
    with pytest.raises(CacheError, match=r"sequences/starts: sequence starts are not increasing "
                                         r"\(entry 2: 1500 after 2000\)"):
        ActivationCache.open(path)


@pytest.mark.slow
def test_corrupt_token_arrays_and_a_truncated_stats_file_give_one_line(tmp_path):
    path = _cache(tmp_path)
    ids = path / "tokens" / "roles" / "c" / "0"
    good = ids.read_bytes()
    ids.write_bytes(good[:10] + bytes(len(good) - 10))
    line = _error_line(run_cli("info", str(path), check=False))
    assert "tokens/" in line and "cannot read the array" in line
    ids.write_bytes(good)
    stats = path / "stats" / "mean_layer_4" / "c" / "0"
    stats.write_bytes(stats.read_bytes()[:40])
    line = _error_line(run_cli("train", str(path), "--out", str(tmp_path / "run"), "--tokens", "1024",
                               "--batch-tokens", "256", "--no-progress", check=False))
    assert "stats/mean_layer_" in line and "cannot read the array" in line


@pytest.mark.slow
def test_stale_creating_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"c.creating-{dead.pid}" / "tokens").mkdir(parents=True)
        (tmp_path / f"c.creating-{alive.pid}" / "tokens").mkdir(parents=True)
        _cache(tmp_path)
        assert not (tmp_path / f"c.creating-{dead.pid}").exists()
        assert (tmp_path / f"c.creating-{alive.pid}").exists()  # never a live process's
    finally:
        alive.kill()
        alive.wait()


def test_version_1_caches_are_still_read(tmp_path):
    path = _cache(tmp_path)
    for sub in ("commits", "index", "stats/chunk_sum_layer_1", "stats/chunk_sum_layer_4", "stats/norm_layer_1",
                "stats/norm_layer_4"):
        shutil.rmtree(path / sub)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"].pop("token_stream_hash")
    doc["attributes"].update(format_version=1, tokens_committed=3000)
    (path / "zarr.json").write_text(json.dumps(doc))
    cache = ActivationCache.open(path)
    assert cache.meta.format_version == 1 and cache.tokens_committed == 3000
    assert np.array_equal(cache.read(4, 100, 2900), _acts()[4][100:2900])
    assert cache.layer_stats(1).mean.shape == (16,)
    with pytest.raises(CacheError, match="format version 1 cache .* can be read but not resumed"):
        _cache(tmp_path)


@pytest.mark.slow
def test_disk_full_while_creating_a_cache(tmp_path):
    """A real full disk: a 1 MiB tmpfs cannot hold the tokenizer the cache stores."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        line = _error_line(run_cli("harvest", "--out", str(mnt / "cache"), "--max-tokens", "600", "--layers", "1",
                                   "--context-size", "128", "--chunk-tokens", "128", check=False))
        assert "cannot create the cache: no space left on the device" in line
        assert list(mnt.iterdir()) == []  # nothing left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_resume_refuses_an_edited_dataset(tmp_path):
    """Kill-and-edit, as a clumsy user would: half the chunks exist, the file changes, the rerun refuses."""
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} about the weather"},
                          {"role": "assistant", "content": f"answer {i}: it is sunny today"}]} for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--dataset", str(data), "--max-tokens", "2000", "--layers", "1", "--context-size", "128",
            "--chunk-tokens", "256", "--no-progress"]
    out = tmp_path / "c"
    run_cli("harvest", "--out", str(out), *args, "--worker", "0/2")
    data.write_text(data.read_text().replace("sunny", "rainy"))  # same number of tokens, other text
    line = _error_line(run_cli("harvest", "--out", str(out), *args, "--worker", "1/2", check=False))
    assert "dataset_fingerprint" in line and "the dataset changed" in line
