"""`cache copy` never makes a "complete" cache that holds other files, never copies a cache into
itself, names a file destination in one line, and leaves no temp file of a killed copy behind; `info
--verify` checks every commit record against the arrays (a hand-edited `rows` fails). Real CLI
subprocesses on local folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache.from_arrays import write_cache_from_arrays
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # CLI subprocesses (a few seconds each)


def _cache(folder: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((1500, 8)).astype(np.float32)
    return write_cache_from_arrays(folder, {2: x}, seq_starts=np.arange(0, 1501, 100), chunk_tokens=400)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("verify:")]  # no bar
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_copy_destinations_that_are_refused(tmp_path):
    src = _cache(tmp_path / "src")
    before = _files(src)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    _one_line(run_cli("cache", "copy", str(src), str(other), "--no-progress", check=False),
              "todo.txt", "not part of this cache")
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]  # nothing was copied into it
    _one_line(run_cli("cache", "copy", str(src), str(src / "sub" / "copy"), "--no-progress", check=False),
              "lies inside the source cache")
    assert _files(src) == before and not (src / "sub").exists()
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    _one_line(run_cli("cache", "copy", str(src), str(a_file), "--no-progress", check=False),
              "file.bin", "exists and is not a folder")
    assert a_file.read_bytes() == b"x"


def test_a_resumed_copy_removes_the_temp_files_of_killed_copies(tmp_path):
    src = _cache(tmp_path / "src")
    dst = tmp_path / "dst"
    run_cli("cache", "copy", str(src), str(dst), "--no-progress")
    # as a copy killed mid-way leaves it: no root document, a chunk missing, a temp file of a dead pid
    (dst / "zarr.json").unlink()
    (dst / "acts" / "layer_2" / "c" / "2" / "0").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = dst / ".tmp" / f"{'ab' * 16}.{int(dead.stdout)}"
    leftover.write_bytes(b"half a chunk")
    out = run_cli("cache", "copy", str(src), str(dst), "--no-progress")
    assert "already there and verified" in out.stdout
    assert not leftover.exists()
    content = {k: v for k, v in _files(dst).items() if not k.startswith(".")}
    assert content == {k: v for k, v in _files(src).items() if not k.startswith(".")}


def test_verify_checks_commit_records_against_the_arrays(tmp_path):
    cache = _cache(tmp_path / "c")
    assert "verified" in run_cli("info", str(cache), "--verify").stdout
    record = cache / "commits" / "1.json"
    good = record.read_bytes()
    doc = json.loads(good)
    for field, value, words in (("rows", 300, ("commits/1.json", "field 'rows' is 300", "holds 400 tokens")),
                                ("rows", 4.0e2, ("commits/1.json", "corrupt commit record", "'rows' is 400.0")),
                                ("files", {**doc["files"], "acts/layer_2/c/1/0": [123, "0" * 16]},
                                 ("commits/1.json", "acts/layer_2/c/1/0 as [123,", "the cache's index"))):
        record.write_text(json.dumps({**doc, field: value}))
        _one_line(run_cli("info", str(cache), "--verify", check=False), *words)
        record.write_bytes(good)
