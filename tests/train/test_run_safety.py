"""A run folder as an attacker or a clumsy user leaves it: a crafted checkpoint file, a torn metrics
line, leftovers of killed writers, a stale LATEST, a second writer, a full disk, a k wider than the SAE."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fast_sae.train.config import ConfigError, GridConfig, TrainConfig
from fast_sae.train.errors import RunError
from fast_sae.train.runfiles import RunLock
from fast_sae.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
GRID = GridConfig(layers=[3], architectures=["standard", "topk"], expansion_factors=[2], l1_coefficients=[0.5], k=[4])


def _cfg(**kw) -> TrainConfig:
    base = dict(tokens=6_000, batch_tokens=100, lr=1e-3, lr_end=1e-4, eval_sequences=10, buffer_tokens=1000,
                log_every=10, checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


def _run(cache, out, stop=None, cfg=None, echo=None):
    return Trainer(cache, out, cfg or _cfg(), GRID, echo=echo or (lambda s: None), progress=False).run(
        stop_after_steps=stop)


def _cli(*args, check: bool = False, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, sys.executable, str(ROOT / "pipeline.py"), "train", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def _one_line_error(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), proc.stderr
    return line


CLI_ARGS = ["--layers", "3", "--architectures", "standard,topk", "--expansion-factors", "2", "--l1-coefficients",
            "0.5", "--k", "4", "--tokens", "6000", "--batch-tokens", "100", "--buffer-tokens", "1000",
            "--eval-sequences", "10", "--log-every", "10", "--lr", "1e-3", "--lr-end", "1e-4", "--no-progress"]


class _Payload:
    """Unpickling this calls exec(): it writes MARKER. Only a pickle loader would ever run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.slow
def test_resume_state_is_not_pickle_and_a_crafted_file_cannot_run_code(small_cache, tmp_path):
    run = tmp_path / "run"
    assert _run(small_cache, run, stop=20).status == "stopped"
    step = run / "checkpoint" / "step_0000000020"
    assert sorted(p.name for p in step.iterdir()) == ["rank0.json", "rank0.safetensors"]
    payload = pickle.dumps(_Payload(tmp_path / "control"))
    pickle.loads(payload)  # the payload is real: a pickle loader runs it
    assert (tmp_path / "control").read_text() == "pwned"

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    torch.save({"step": 20, "x": _Payload(marker)}, tmp_path / "evil.pt")  # a torch checkpoint with the payload
    good = {p.name: p.read_bytes() for p in step.iterdir()}
    cases = [  # (file -> bytes) put into the step folder, expected message
        ({"rank0.safetensors": payload}, "unreadable safetensors"),
        ({"rank0.json": payload}, "not JSON"),
        ({"rank0.json": json.dumps({"format": "fast-sae-state/1", "state": {"py/reduce": "os.system"}}).encode()},
         "unexpected value"),
    ]
    for files, message in cases:
        for name, data in files.items():
            (step / name).write_bytes(data)
        with pytest.raises(RunError, match=message):
            _run(small_cache, run)
        assert not marker.exists()
        for name, data in good.items():
            (step / name).write_bytes(data)
    # the old pickle format: a crafted rank0.pt is refused, never loaded
    for name in good:
        (step / name).unlink()
    shutil.copy(tmp_path / "evil.pt", step / "rank0.pt")
    with pytest.raises(RunError, match="old pickle format, which is never loaded"):
        _run(small_cache, run)
    assert not marker.exists()


@pytest.mark.slow
def test_a_crafted_pickle_checkpoint_through_the_cli_runs_nothing(small_cache, tmp_path):
    run = tmp_path / "run"
    _cli(small_cache, "--out", run, *CLI_ARGS, "--stop-after-steps", "20", check=True)
    step = run / "checkpoint" / "step_0000000020"
    for f in step.iterdir():
        f.unlink()
    marker = tmp_path / "marker"
    torch.save({"step": 20, "x": _Payload(marker)}, step / "rank0.pt")
    line = _one_line_error(_cli(small_cache, "--out", run, *CLI_ARGS))
    assert "old pickle format, which is never loaded" in line and "rank0.pt" in line
    assert not marker.exists()


def test_resumed_state_round_trips_every_tensor_and_value(small_cache, tmp_path):
    from fast_sae.train.statefile import load_state, save_state

    state = {"step": 3, "rng": torch.get_rng_state(), "opt": {"state": {0: {"step": torch.tensor(3.0),
             "exp_avg": torch.randn(4, 5, dtype=torch.float64)}}, "param_groups": [{"betas": (0.9, 0.999),
             "lr": 7e-5, "params": [0], "foreach": None, "eps": 1e-8}]}, "w": torch.arange(6).view(2, 3)}
    state["alias"] = state["w"][0]  # shares memory with w
    save_state(tmp_path / "s", state)
    back = load_state(tmp_path / "s")
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in back["opt"]["state"]
    assert torch.equal(back["rng"], state["rng"]) and torch.equal(back["alias"], state["w"][0])
    t = back["opt"]["state"][0]["exp_avg"]
    assert t.dtype == torch.float64 and torch.equal(t, state["opt"]["state"][0]["exp_avg"])


@pytest.mark.slow
def test_torn_metrics_line_is_dropped_on_resume(small_cache, tmp_path):
    _run(small_cache, tmp_path / "straight")
    run = tmp_path / "run"
    _run(small_cache, run, stop=25)
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 30, "tokens": 3000, "split": "tr')  # a kill in the middle of an append
    assert _run(small_cache, run).status == "finished"
    assert metrics.read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    # a damaged line that is not the last one is not guessed at: one line naming it
    run2 = tmp_path / "run2"
    _run(small_cache, run2, stop=25)
    lines = (run2 / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:15]
    (run2 / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"metrics.jsonl line 2: not a JSON object"):
        _run(small_cache, run2)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_and_a_stale_latest_are_cleaned(small_cache, tmp_path):
    run = tmp_path / "run"
    _run(small_cache, run, stop=20)
    dead = _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ck = run / "checkpoint"
        leftovers = [run / f"L3_topk_x2_k4.tmp-{dead}", run / f"run_config.json.tmp-{dead}",
                     run / f"summary.json.tmp-{dead}", ck / f"LATEST.tmp-{dead}",
                     ck / "step_0000000010", ck / "step_0000000020" / f"rank0.safetensors.tmp-{dead}"]
        leftovers[0].mkdir()
        (leftovers[0] / "sae_weights.safetensors").write_bytes(b"\0" * 4096)
        leftovers[4].mkdir()
        for f in leftovers[1:4] + leftovers[5:]:
            f.write_bytes(b"partial")
        kept = run / f"L3_standard_x2_l1_0.5.tmp-{alive.pid}"  # a live writer's temp is not touched
        kept.mkdir()
        assert _run(small_cache, run).status == "finished"
        assert [p for p in leftovers if p.exists()] == [] and kept.is_dir()
    finally:
        alive.kill()
        alive.wait()

    # a checkpoint that outlived its finished run (a kill while removing it) goes on the next call
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "LATEST").write_text(json.dumps({"step": 20, "folder": "step_0000000020", "world_size": 1}))
    assert _run(small_cache, run).status == "already finished" and not (run / "checkpoint").exists()

    # a LATEST naming a folder that is gone: nothing to resume from, say so and start over
    run2 = tmp_path / "run2"
    _run(small_cache, run2, stop=20)
    shutil.rmtree(run2 / "checkpoint" / "step_0000000020")
    said: list[str] = []
    assert _run(small_cache, run2, echo=said.append).status == "finished"
    assert any("does not exist; starting from step 0" in s for s in said)


@pytest.mark.slow
def test_a_second_writer_is_refused_with_a_clear_message(small_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from fast_sae.train.runfiles import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(_cli(small_cache, "--out", run, *CLI_ARGS))
        assert f"{run} is in use by another training process (pid {holder.pid}" in line
        with pytest.raises(RunError, match="in use by another training process"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run).acquire()  # the kernel dropped the dead holder's lock
    lock.release()
    assert _run(small_cache, run).status == "finished"


def test_k_larger_than_d_sae_is_a_config_error(small_cache, tmp_path):
    grid = GridConfig(layers=[3], architectures=["topk"], expansion_factors=[2], k=[33])
    with pytest.raises(ConfigError, match=r"k 33 of L3_topk_x2_k33 is larger than its d_sae 32 \(d_model 16 x "
                                          r"expansion factor 2\)"):
        Trainer(small_cache, tmp_path / "run", _cfg(), grid, echo=lambda s: None, progress=False)



@pytest.mark.slow
def test_k_larger_than_d_sae_through_the_cli(small_cache, tmp_path):
    line = _one_line_error(_cli(small_cache, "--out", tmp_path / "run", *CLI_ARGS, "--architectures", "batchtopk",
                                "--k", "40"))
    assert "k 40 of L3_batchtopk_x2_k40 is larger than its d_sae 32" in line


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_resumable(small_cache, tmp_path):
    """A real size-limited filesystem: a tmpfs (in a private mount namespace, so no root is needed)."""
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux `unshare` to mount a size-limited tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    train = [sys.executable, str(ROOT / "pipeline.py"), "train", str(small_cache), "--out", str(mnt / "run"),
             *CLI_ARGS, "--expansion-factors", "64", "--checkpoint-every", "20"]
    script = (f"mount -t tmpfs -o size=160k tmpfs {mnt} || exit 90; "
              f"{' '.join(map(_q, train))}; echo RC1=$?; df -k {mnt} | tail -1; "
              f"mount -o remount,size=16m {mnt} && {' '.join(map(_q, train))}; echo RC2=$?")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert "RC1=" in proc.stdout, (proc.returncode, proc.stderr)
    first_err = proc.stderr.split("Error: ", 1)
    assert "RC1=1" in proc.stdout and len(first_err) == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = "Error: " + first_err[1].splitlines()[0]
    assert "cannot write checkpoint (No space left on device)" in line and "step_0000000020" in line
    assert "RC2=0" in proc.stdout, proc.stderr  # after space is freed, the same command finishes


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
