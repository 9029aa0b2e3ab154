"""SAEBench through the real library, offline, in .venv-saebench (setup_saebench.sh; skipped without it).

- TransformerLens loads the embedded model from its folder (the name check patched at run time) and
  its layer-3 residual equals transformers' within 1e-3; the layer cut-off leaves it unchanged.
- `pipeline.py evaluate --saebench absorption` runs SAEBench's absorption eval on a tiny SAE (a
  130-word vocabulary sample, k-sparse probes up to k = 2) and its result reaches report.json/md.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fast_sae.evaluate.saebench.config import default_venv
from fast_sae.lm import EMBEDDED_MODEL, embedded_model_dir
from tests.evaluate.helpers import make_cache, save_random_sae
from tests.helpers import ROOT, run_cli

VPY = default_venv() / "bin" / "python"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VPY.is_file(), reason=f"no SAEBench venv at {VPY.parent.parent} "
                                                           "(./setup_saebench.sh; setup.sh makes it unless "
                                                           "FAST_SAE_NO_SAEBENCH=1)")]

CHECK = """
import json, sys, torch
from fast_sae.evaluate.saebench.tl_model import local_folders, stop_after_hooks
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
try:
    HookedTransformer.from_pretrained_no_processing(folder, device="cpu")
    refused = None
except ValueError as exc:
    refused = str(exc).split(". Valid")[0][-40:]
with local_folders():
    tl = HookedTransformer.from_pretrained_no_processing(folder, device="cpu", dtype=torch.float32)
hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
ids = tl.to_tokens("<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n", prepend_bos=False)
hook = "blocks.3.hook_resid_post"
with torch.no_grad():
    ref = hf(ids, output_hidden_states=True).hidden_states[4]
    _, full = tl.run_with_cache(ids, names_filter=[hook])
    with stop_after_hooks() as cut:
        out, part = tl.run_with_cache(ids, names_filter=[hook])
print(json.dumps({"refused": refused, "n_layers": tl.cfg.n_layers, "d_model": tl.cfg.d_model,
                  "max_abs": float((full[hook] - ref).abs().max()), "scale": float(ref.abs().max()),
                  "cut": cut, "cut_equal": bool(torch.equal(part[hook], full[hook])),
                  "cut_output": list(out.shape)}))
"""


def test_transformer_lens_loads_the_embedded_folder_and_matches_transformers() -> None:
    folder = embedded_model_dir()
    proc = subprocess.run([str(VPY), "-c", CHECK, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["refused"] is not None and "not found" in got["refused"]  # without the patch TL refuses the folder
    assert (got["n_layers"], got["d_model"]) == (30, 576)
    assert got["max_abs"] < 1e-3, got  # the same residual as transformers (the scale is ~10-100)
    assert got["cut"] == [4] and got["cut_equal"] and got["cut_output"][-1] == 576  # stopped after block 3


def test_absorption_on_a_tiny_sae_through_the_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = make_cache(tmp_path / "cache", {3: rng.normal(size=(64, 576)).astype(np.float32)}, [32, 32],
                       model_id=EMBEDDED_MODEL, token_ids=rng.integers(0, 40_000, 64), n_model_layers=30)
    sae = save_random_sae(tmp_path / "tiny", 576, 64, 3, model_name=EMBEDDED_MODEL)
    out = tmp_path / "ev"
    run_cli("evaluate", "--sae", str(sae), "--eval-cache", str(cache), "--out", str(out), "--no-downstream",
            "--no-probes", "--no-plots", "--no-progress", "--saebench", "absorption", "--saebench-vocab-size", "130",
            "--saebench-min-letters", "1", "--saebench-max-k", "2", "--saebench-probe-epochs", "5",
            "--saebench-timeout-minutes", "20", timeout=1500)
    report = json.loads((out / "report.json").read_text())
    got = report["rows"][0]["saebench"]["absorption"]
    assert "error" not in got, got
    assert got["n_letters"] >= 1 and set(got["letters"]) <= set("abcdefghijklmnopqrstuvwxyz")
    assert 0 <= got["mean_absorption_fraction"] <= 1 and 0 <= got["mean_full_absorption"] <= 1
    assert len(got["probe_f1"]) == 26  # every letter kept in the sample had a probe
    assert sum(f > 0.6 for f in got["probe_f1"].values()) == got["n_letters"]
    assert got["sae"]["decoder_folded"] is True and got["sae"]["hook_name"] == "blocks.3.hook_resid_post"
    raw = json.loads(Path(got["file"]).read_text())  # SAEBench's own file, with our settings in its config
    assert raw["eval_config"]["max_k_value"] == 2 and raw["eval_config"]["model_name"] == "SmolLM2-135M-Instruct"
    settings = report["saebench"]
    assert settings["absorption"]["vocab_size"] == 130 and settings["layers"] == [3]
    worker = json.loads((out / "saebench" / "worker_result.json").read_text())
    assert worker["cut_forwards"] > 0 and worker["versions"]["sae-bench"] == "0.6.0"
    assert "+cu" not in worker["versions"]["torch"]
    md = (out / "report.md").read_text()
    assert "## SAEBench" in md and "130 words" in md and f"{got['mean_full_absorption']:.4f}" in md
