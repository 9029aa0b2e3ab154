"""Bad inputs give one clear line (click's `Error: ...`), exit non-zero, and lose nothing."""
import json
import shutil

import pytest

from fast_sae.lm import embedded_model_dir
from tests.helpers import run_cli

SMALL = ["--max-tokens", "600", "--layers", "1", "--context-size", "128", "--chunk-tokens", "128"]


def _error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("Error:"), proc.stderr
    return lines[-1]


@pytest.mark.slow
def test_unknown_layer(tmp_path):
    line = _error_line(run_cli("harvest", "--out", str(tmp_path / "c"), "--layers", "99", check=False))
    assert "layer 99" in line and "0..29" in line
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_reopening_with_other_arguments_keeps_the_cache(tmp_path):
    out = tmp_path / "c"
    run_cli("harvest", "--out", str(out), *SMALL)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _error_line(run_cli("harvest", "--out", str(out), *SMALL[:-1], "64", check=False))
    assert "different arguments" in line and "chunk_tokens" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_corrupt_caches_are_detected(tmp_path):
    out = tmp_path / "c"
    run_cli("harvest", "--out", str(out), *SMALL)
    chunk = out / "acts" / "layer_1" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    line = _error_line(run_cli("harvest", "--out", str(out), *SMALL, check=False))
    assert str(chunk) in line and "truncated or corrupt" in line
    (out / "zarr.json").write_text("{not json")
    line = _error_line(run_cli("info", str(out), check=False))
    assert "zarr.json" in line and "corrupt" in line
    line = _error_line(run_cli("info", str(tmp_path / "nothing"), check=False))
    assert "no such cache folder" in line


@pytest.mark.slow
def test_malformed_dataset_rows(tmp_path):
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "text": "no content field"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    line = _error_line(run_cli("harvest", "--out", str(tmp_path / "c"), "--dataset", str(data), *SMALL, check=False))
    assert "row 1" in line and "messages[0]" in line and "content" in line
    data.write_text(json.dumps({"question": "q", "answer": "a"}))
    line = _error_line(run_cli("harvest", "--out", str(tmp_path / "c"), "--dataset", str(data), *SMALL, check=False))
    assert "no conversation found" in line


@pytest.mark.slow
def test_model_without_chat_template(tmp_path):
    src = embedded_model_dir()
    folder = tmp_path / "no-template-model"
    folder.mkdir()
    for f in src.iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            (folder / f.name).write_text(json.dumps(cfg))
        elif f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        else:
            shutil.copy(f, folder / f.name)
    line = _error_line(run_cli("harvest", "--out", str(tmp_path / "c"), "--model", str(folder), *SMALL, check=False))
    assert "no chat template" in line
    # plain-text block training needs no template
    run_cli("harvest", "--out", str(tmp_path / "p"), "--model", str(folder), "--regime", "bt-p", *SMALL)
