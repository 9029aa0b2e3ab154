"""A crafted resume state is checked field by field before any use (fast_sae/train/resume.py): a step
far beyond the run, a step of the wrong type, empty or misshapen stacks and optimizers, a bad RNG
state, a LATEST or run_config.json of the wrong shape each end as one line naming the file and the
field, with no work done for the number in the file."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fast_sae.train.errors import RunError
from tests.train.test_run_safety import CLI_ARGS, _cli, _one_line_error, _run

pytestmark = pytest.mark.slow  # real training runs (a few seconds each)

STEP = "step_0000000020"


def _entries(doc: dict) -> dict:
    """The top-level state dict of a rank0.json as {name: encoded value}."""
    return dict(doc["state"]["dict"])


def _with(doc: dict, **changes) -> bytes:
    state = _entries(doc)
    state.update(changes)
    return json.dumps({**doc, "state": {"dict": [[k, v] for k, v in state.items()]}}).encode()


def _first_group_tensors(doc: dict) -> dict:
    groups = dict(_entries(doc)["groups"]["dict"])
    return dict(next(iter(groups.values()))["dict"])


def test_crafted_resume_state_fields_are_one_line_each(small_cache, tmp_path):
    run = tmp_path / "run"
    assert _run(small_cache, run, stop=20).status == "stopped"
    ckpt = run / "checkpoint"
    state_file = ckpt / STEP / "rank0.json"
    good = {f: f.read_bytes() for f in (state_file, ckpt / "LATEST", run / "run_config.json", run / "metrics.jsonl")}
    doc = json.loads(good[state_file])
    tensors = _first_group_tensors(doc)
    group_name = next(iter(dict(_entries(doc)["groups"]["dict"])))
    w_enc_shaped_like_b_enc = dict(_entries(doc)["groups"]["dict"])
    w_enc_shaped_like_b_enc[group_name] = {"dict": [[k, tensors["b_enc"] if k == "W_enc" else v]
                                                    for k, v in tensors.items()]}
    latest = json.loads(good[ckpt / "LATEST"])
    cases: list[tuple[Path, bytes, str]] = [
        (state_file, _with(doc, step="abc"), "field 'step' is abc, expected an integer in 0..60"),
        (state_file, _with(doc, step=-5), "field 'step' is -5, expected an integer in 0..60"),
        (state_file, _with(doc, step=2.5), "field 'step' is 2.5, expected an integer"),
        (state_file, _with(doc, step=19), "field 'step' is 19, but LATEST names step 20"),
        (state_file, _with(doc, groups={"dict": []}), "field 'groups' is \\[\\], expected the run's SAE stacks"),
        (state_file, _with(doc, optims=[]), "field 'optims' is list, expected the run's optimizers"),
        (state_file, _with(doc, groups={"dict": [[k, v] for k, v in w_enc_shaped_like_b_enc.items()]}),
         f"field 'groups.{group_name}.W_enc' is a torch.float32 tensor of shape \\(1, 32\\), expected torch.float32 of "
         f"shape \\(1, 16, 32\\)"),
        (state_file, _with(doc, torch_rng=tensors["b_enc"]), "field 'torch_rng' is a torch.float32 tensor"),
        (state_file, _with(doc, torch_rng="seed"), "field 'torch_rng' is str, expected a tensor"),
        (ckpt / "LATEST", json.dumps({**latest, "world_size": 1.5}).encode(),
         "LATEST: corrupt checkpoint pointer \\(field 'world_size' is 1.5, expected a positive integer\\)"),
        (ckpt / "LATEST", json.dumps({**latest, "world_size": "1"}).encode(), "field 'world_size' is 1, expected"),
        (ckpt / "LATEST", json.dumps({**latest, "step": 10**9}).encode(), "field 'folder' is step_0000000020, "
                                                                          "expected step_1000000000"),
        (run / "run_config.json", b"[1, 2]", "run_config.json: corrupt run configuration \\(is list, expected a "
                                             "JSON object\\)"),
        (run / "run_config.json", json.dumps({**json.loads(good[run / "run_config.json"]), "grid": 3}).encode(),
         "field 'grid' is 3, expected an object"),
        (run / "metrics.jsonl", b'{"step": "abc", "split": "train"}\n' + good[run / "metrics.jsonl"],
         "metrics.jsonl row 1: field 'step' is abc, expected an integer"),
    ]
    for f, data, message in cases:
        f.write_bytes(data)
        with pytest.raises(RunError, match=message) as info:
            _run(small_cache, run)
        assert "\n" not in str(info.value)
        f.write_bytes(good[f])
    assert _run(small_cache, run).status == "finished"  # the untouched checkpoint still resumes


def test_a_step_far_beyond_the_run_is_refused_at_once_through_the_cli(small_cache, tmp_path):
    run = tmp_path / "run"
    _cli(small_cache, "--out", run, *CLI_ARGS, "--stop-after-steps", "20", check=True)
    ckpt = run / "checkpoint"
    state_file = ckpt / STEP / "rank0.json"
    doc = json.loads(state_file.read_bytes())
    new_folder = ckpt / "step_1000000000"
    (ckpt / STEP).rename(new_folder)
    (new_folder / "rank0.json").write_bytes(_with(doc, step=10**9))
    (ckpt / "LATEST").write_text(json.dumps({"step": 10**9, "folder": new_folder.name, "world_size": 1}))
    t0 = time.perf_counter()
    line = _one_line_error(_cli(small_cache, "--out", run, *CLI_ARGS))  # main: replays the buffer until killed
    assert time.perf_counter() - t0 < 120
    assert "rank0.json: field 'step' is 1000000000, expected an integer in 0..60" in line, line
    (ckpt / "LATEST").write_text(json.dumps({"step": 20, "folder": new_folder.name, "world_size": "two"}))
    line = _one_line_error(_cli(small_cache, "--out", run, *CLI_ARGS))
    assert "LATEST: corrupt checkpoint pointer" in line, line


def test_out_naming_an_existing_file_is_one_line(small_cache, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    line = _one_line_error(_cli(small_cache, "--out", a_file, *CLI_ARGS))
    assert "notes.txt: exists and is not a folder" in line, line
    assert a_file.read_text() == "mine"
