#!/usr/bin/env bash
# The interpretability and intervention measurements on the demo's SAEs that do not fit the demo's
# ~30 minutes (bench/RESULTS.md: "Judge calibration and the intervention without a judge",
# "SAEBench through the real library"). Run after `python3 pipeline.py demo`; ~1.5 h on 2 idle cores.
# One SAE per regime at matched L0 (TopK k = 32), scored on the demo's held-out FAST conversations.
# Usage: bash bench/interpretability.sh [DEMO_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-runs/demo}
out=${2:-runs/interpretability}
saes=()
for regime in fast bt-f bt-p; do saes+=(--sae "$demo/runs/$regime/L15_topk_x2_k32"); done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per forward: on 2 loaded cores two were 7x slower
# the special-token intervention without a judge (reference-reply likelihood vs two controls)
python3 pipeline.py evaluate "${saes[@]}" --eval-cache "$demo/caches/fast-eval" --out "$out/intervention" \
  --intervention --no-steer-generate --no-judge --alphas 0,50,200 --steer-conversations 12 \
  --steer-random-directions 3 --steer-matched-features 3 --no-downstream --no-probes
# the judge's calibration (the local 135M judge: expected to fail, which keeps its scores out of every table)
python3 pipeline.py evaluate "${saes[@]:0:2}" --eval-cache "$demo/caches/fast-eval" --out "$out/judge" \
  --intervention --no-steer-generate --no-steer-likelihood --judge-max-new-tokens 8 --judge-retries 1 \
  --no-downstream --no-probes
# SAEBench (its own venv, ./setup_saebench.sh): absorption on a vocabulary sample, core, one sae-probes dataset
python3 pipeline.py evaluate "${saes[@]}" --eval-cache "$demo/caches/fast-eval" --out "$out/saebench" \
  --no-downstream --no-probes --saebench absorption,core,sparse_probing_sae_probes --saebench-vocab-size 1000 \
  --saebench-min-letters 10 --saebench-core-batches 2 --saebench-probe-datasets 117_us_state_FL
python3 pipeline.py compare "$out/intervention" "$out/saebench" --out "$out/compare"
echo "interpretability measurements: $out/compare/compare.md"
