"""`pipeline.py converge` end to end on tiny sizes: seeds change the SAEs and reproduce them, every SAE
is scored on three held-out formats and its own training documents, and the report has its tables."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from .helpers import run_cli, train_env

SIZES = ["--harvest-tokens", "1500", "--eval-tokens", "700", "--context-size", "128", "--layer", "2",
         "--expansion-factor", "1", "--k", "8", "--core-tokens-per-latent", "6", "--batch-tokens", "256",
         "--fit-sample-tokens", "400"]


def _weights(run_folder, arch):
    (sae,) = [p for p in run_folder.iterdir() if p.is_dir() and f"_{arch}_" in p.name]
    return load_file(str(sae / "sae_weights.safetensors"))


@pytest.mark.slow
def test_tiny_study_seeds_cross_evaluation_and_report(tmp_path):
    caches, out = tmp_path / "caches", tmp_path / "study"
    run_cli("converge", "--out", str(out), "--caches", str(caches), "--seeds", "0,1", "--tokens-per-latent", "3",
            "--sweep-tokens-per-latent", "3", "--l1-coefficients", "1,10", "--l0-coefficients", "0.1,1", *SIZES,
            timeout=1800, env=train_env())
    assert {p.name for p in caches.iterdir()} == {"fast", "bt-f", "bt-p", "fast-eval", "bt-f-eval", "bt-p-eval"}
    runs = out / "runs"
    for regime in ("fast", "bt-f", "bt-p"):
        a, b = _weights(runs / regime / "topk_tpl6_seed0", "topk"), _weights(runs / regime / "topk_tpl6_seed1", "topk")
        assert not any(a[k].equal(b[k]) for k in ("W_enc", "W_dec")), regime  # another init and data order
        assert (runs / regime / "topk_tpl3_seed1" / "summary.json").is_file()
        for arch in ("standard", "jumprelu"):
            assert (runs / regime / f"sweep_{arch}_tpl3_seed0" / "summary.json").is_file()
        held = json.loads((out / "eval" / "heldout" / regime / "topk_tpl6_seed0" / "report.json").read_text())
        assert {r["eval_label"] for r in held["rows"]} == {"fast", "bt-f", "bt-p"}
        fit = json.loads((out / "eval" / "fit" / regime / "topk_tpl6_seed0" / "report.json").read_text())
        assert {r["eval_regime"] for r in fit["rows"]} == {regime}
    summary = json.loads((out / "converge.json").read_text())
    cell = summary["cells"]["topk|fast|6|fast"]
    assert cell["star.special.log2_mse"]["n"] == 2 and cell["star.special.log2_mse"]["sd"] is not None
    assert cell["star.l0"]["mean"] == pytest.approx(8.0)  # TopK: L0 = k on every token
    gaps = summary["gaps"]["star.content.log2_mse"]
    assert {(g["versus"], g["format"]) for g in gaps if g["architecture"] == "topk" and
            g["tokens_per_latent"] == 6} == {(o, f) for o in ("bt-f", "bt-p") for f in ("fast", "bt-f", "bt-p")}
    md = (out / "converge.md").read_text()
    for heading in ("Held-out FAST conversations", "The gap against training length", "Cross-evaluation",
                    "Memorisation", "Held-out convergence", "frontiers at matched L0"):
        assert heading in md, heading
    assert (out / "gaps_vs_tokens.png").is_file() and (out / "sweeps_compare" / "compare.md").is_file()

    # the same seed in a new study folder gives the same SAEs, bit for bit (one torch thread in both)
    run_cli("converge", "--out", str(tmp_path / "again"), "--caches", str(caches), "--seeds", "0", "--parts", "core",
            *SIZES, timeout=900, env=train_env())
    for arch in ("topk", "batchtopk"):
        a = _weights(runs / "bt-f" / "topk_tpl6_seed0", arch)
        b = _weights(tmp_path / "again" / "runs" / "bt-f" / "topk_tpl6_seed0", arch)
        assert all(a[k].equal(b[k]) for k in a), arch
