"""Many harvest workers on one cache (real subprocesses of the CLI, the real model): the result is the
bytes of a single-worker harvest, with workers run together, killed mid-chunk and restarted, or late."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fast_sae.actcache import ActivationCache
from tests.helpers import ROOT, run_cli

ARGS = ["--max-tokens", "4000", "--layers", "1,3", "--context-size", "256", "--chunk-tokens", "256",
        "--batch-tokens", "512", "--no-progress"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "harvest", "--out", str(out), *ARGS, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _commits(out: Path) -> set[str]:
    folder = out / "commits"
    return {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli("harvest", "--out", str(out), *ARGS, env={"OMP_NUM_THREADS": "1"})
    return out, _files(out)


@pytest.mark.slow
def test_two_workers_equal_one(reference, tmp_path):
    out = tmp_path / "two"
    procs = [_start(out, "--worker", "0/2"), _start(out, "--worker", "1/2")]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    assert ActivationCache.open(out).complete
    got = _files(out)
    assert got.keys() == reference[1].keys()
    assert [k for k in got if got[k] != reference[1][k]] == []


@pytest.mark.slow
def test_a_second_copy_of_a_worker_is_refused(reference):
    """While another process holds worker 1/2's chunks, a second worker 1/2 (or a plain harvest, whose
    share overlaps) stops with one line; worker 0/2 (a disjoint share) is not blocked."""
    out = reference[0]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from fast_sae.actcache.locking import ChunkLock; "
        f"lock = ChunkLock(Path({str(out)!r}), 8, 16, 'x'); print('held', flush=True); time.sleep(120)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        twin = run_cli("harvest", "--out", str(out), *ARGS, "--worker", "1/2", check=False)
        assert twin.returncode == 1, twin.stdout + twin.stderr
        assert "another harvest is writing worker 1/2's share" in twin.stderr and "Traceback" not in twin.stderr
        plain = run_cli("harvest", "--out", str(out), *ARGS, check=False)
        assert plain.returncode == 1 and "another harvest is writing this cache" in plain.stderr
        assert "already complete" in run_cli("harvest", "--out", str(out), *ARGS, "--worker", "0/2").stdout
    finally:
        holder.kill()
        holder.wait()
    assert "already complete" in run_cli("harvest", "--out", str(out), *ARGS, "--worker", "1/2").stdout


@pytest.mark.slow
def test_three_workers_with_one_killed_mid_chunk_and_restarted(reference, tmp_path):
    out = tmp_path / "three"
    first = _start(out, "--worker", "1/3")
    deadline = time.time() + 300
    while len(_commits(out)) < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "worker 1/3 finished before it could be killed"
    os.kill(first.pid, signal.SIGKILL)  # mid-share: the next chunk of its share is half assembled
    first.wait()
    partial = _commits(out)
    others = [_start(out, "--worker", "0/3"), _start(out, "--worker", "2/3")]
    for p in others:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    assert not ActivationCache.open(out, require_complete=False).complete  # worker 1's share is unfinished
    refused = run_cli("harvest", "--out", str(out), *ARGS, "--finalize", check=False)
    assert refused.returncode == 1 and "chunks are not done" in refused.stderr
    again = run_cli("harvest", "--out", str(out), *ARGS, "--worker", "1/3")  # the restart, the last worker
    assert f"{len(partial)} of" in again.stdout + again.stderr or partial == set()
    assert '"complete": true' in again.stdout
    got = _files(out)
    assert got.keys() == reference[1].keys()
    assert [k for k in got if got[k] != reference[1][k]] == []
    assert "already complete" in run_cli("harvest", "--out", str(out), *ARGS, "--finalize").stdout


@pytest.mark.slow
def test_two_plain_harvests_started_together(tmp_path):
    out = tmp_path / "race"
    procs = [_start(out), _start(out)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [r[1][-2000:] for r in results]
    err = next(r[1] for p, r in zip(procs, results) if p.returncode == 1)
    assert "another harvest is writing this cache" in err and "Traceback" not in err
    assert ActivationCache.open(out).complete
    assert not list(tmp_path.glob("race.creating-*"))


@pytest.mark.slow
def test_two_workers_harvesting_into_s3_write_the_bytes_of_one_on_disk(reference, s3):
    """Chunk contents and metadata in the bucket equal, key for key and byte for byte, the local cache."""
    from fast_sae.actcache.store import open_store

    url = f"s3://{s3.bucket()}/harvest"
    flags = ["--storage-option", f"endpoint={s3.endpoint}"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "harvest", "--out", url, *ARGS, *flags,
                               "--worker", f"{i}/2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    store = open_store(url, {"endpoint": s3.endpoint})
    remote = {k: bytes(store.get(k)) for k in sorted(store.list())}
    local = {k: v for k, v in reference[1].items() if not k.startswith(".")}  # .lock: local-only, not content
    assert remote.keys() == local.keys()
    assert [k for k in remote if remote[k] != local[k]] == []
    assert ActivationCache.open(url, options={"endpoint": s3.endpoint}).complete


@pytest.mark.slow
def test_torchrun_runs_one_worker_per_rank(reference, tmp_path):
    out = tmp_path / "torchrun"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "pipeline.py"), "harvest", "--out", str(out), *ARGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"worker": "0/2"' in proc.stdout and '"worker": "1/2"' in proc.stdout
    got = _files(out)
    assert got.keys() == reference[1].keys()
    assert [k for k in got if got[k] != reference[1][k]] == []
