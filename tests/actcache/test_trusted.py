"""Chunk files verified once are not hashed again while unchanged; any change is hashed and caught.

Real caches on disk, real files changed the way a user or a faulty copy changes them; the record's
folder is this test's own (FAST_SAE_VERIFIED_RECORD). Counting calls to the real xxh3 tells whether a
reader hashed a chunk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache import reader as reader_module
from fast_sae.actcache.audit import verify_all
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.actcache.trusted import VerifiedRecord


@pytest.fixture
def records(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "records"
    monkeypatch.setenv("FAST_SAE_VERIFIED_RECORD", str(folder))
    return folder


@pytest.fixture
def hashes(monkeypatch) -> list[int]:
    """Sizes of the chunk files the reader hashes (the real xxh3, counted)."""
    seen: list[int] = []
    real = reader_module.checksum_int

    def counted(data):
        seen.append(len(memoryview(data).cast("B")))
        return real(data)

    monkeypatch.setattr(reader_module, "checksum_int", counted)
    return seen


def _acts(n=2048, d=8):
    return {3: np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)}


def _cache(path: Path) -> Path:
    return Path(write_cache_from_arrays(path, _acts(), seq_starts=[0, 1000, 2048], chunk_tokens=512))


def _read_all(path: Path) -> np.ndarray:
    return ActivationCache.open(path).read(3, 0, 2048)


def _chunk(path: Path, i: int = 1) -> Path:
    return path / "acts" / "layer_3" / "c" / str(i) / "0"


def test_chunks_written_here_are_not_hashed_again(tmp_path, records, hashes) -> None:
    path = _cache(tmp_path / "c")
    assert len(list(records.glob("*.log"))) == 1  # the harvest's writer recorded its chunk files
    np.testing.assert_array_equal(_read_all(path), _acts()[3])
    assert hashes == []  # a new reader trusted all four, unchanged since they were written


def test_a_bit_flip_is_caught_even_with_mtime_put_back(tmp_path, records, hashes) -> None:
    path = _cache(tmp_path / "c")
    f = _chunk(path)
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[100] ^= 0x10
    with open(f, "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as it was; ctime cannot be put back
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_ino == st.st_ino
    with pytest.raises(CacheError, match=r"acts/layer_3/c/1/0: checksum mismatch"):
        _read_all(path)
    assert len(hashes) == 1  # chunk 0 was trusted, chunk 1 hashed (and refused)


def test_a_forged_or_copied_record_does_not_skip_the_hash(tmp_path, records, hashes) -> None:
    path = _cache(tmp_path / "c")
    log = next(records.glob("*.log"))
    f = _chunk(path)
    old = f"{' '.join(map(str, _ident(f)))}"
    data = bytearray(f.read_bytes())
    data[0] ^= 0x01
    f.write_bytes(bytes(data))
    # the record edited to the changed file's identity (its MAC no longer matches)
    log.write_text(log.read_text().replace(old, " ".join(map(str, _ident(f)))))
    assert " ".join(map(str, _ident(f))) in log.read_text()
    with pytest.raises(CacheError, match="checksum mismatch"):
        _read_all(path)
    # a record of another cache, at its path, does not vouch for this one (the MAC covers the path)
    other = _cache(tmp_path / "other")
    shutil.rmtree(path)
    shutil.copytree(other, path)
    (records / log.name).write_text(next(p for p in records.glob("*.log") if p != log).read_text())
    hashes.clear()
    np.testing.assert_array_equal(_read_all(path), _acts()[3])
    assert len(hashes) == 4  # all hashed: the copied files and the copied record are not trusted


def test_the_first_reader_and_info_verify_record_what_they_hashed(tmp_path, records, hashes) -> None:
    path = _cache(tmp_path / "c")
    shutil.rmtree(records)  # as if written by another user: nothing recorded here
    _read_all(path)
    assert len(hashes) == 4
    _read_all(path)
    assert len(hashes) == 4  # the first reader's record is used by the next
    shutil.rmtree(records)
    verify_all(ActivationCache.open(path))
    hashes.clear()
    _read_all(path)
    assert hashes == []
    # a file replaced by an identical copy (new inode) is hashed again, once
    shutil.copyfile(_chunk(path, 2), tmp_path / "copy")
    os.replace(tmp_path / "copy", _chunk(path, 2))
    _read_all(path)
    assert len(hashes) == 1


def test_the_record_can_be_switched_off(tmp_path, records, hashes, monkeypatch) -> None:
    path = _cache(tmp_path / "c")
    monkeypatch.setenv("FAST_SAE_VERIFIED_RECORD", "off")
    assert not VerifiedRecord(path).enabled
    _read_all(path)
    _read_all(path)
    assert len(hashes) == 8


def test_torn_and_foreign_lines_are_ignored(tmp_path, records, hashes) -> None:
    path = _cache(tmp_path / "c")
    log = next(records.glob("*.log"))
    lines = log.read_text().splitlines()
    log.write_text("garbage\n" + lines[0][:20] + "\n" + "\n".join(lines[1:]) + "\nx 1 2 3 4 5 zz yy\n")
    _read_all(path)
    assert len(hashes) == 1  # only the chunk whose line was torn


def _ident(f: Path) -> tuple[int, ...]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev
