#!/usr/bin/env bash
# Creates the SAEBench environment, .venv-saebench/ at the repository root, for
# `pipeline.py evaluate --saebench absorption,core,sparse_probing_sae_probes`: evaluate (in the main
# environment) runs SAEBench in this venv as a subprocess (fast_sae/evaluate/saebench/).
#
# Why a second venv: sae-bench 0.6.0 pins numpy<2 and datasets<4 and depends on an unpinned
# torchvision, whose newest release pins a CUDA torch and replaces the CPU one. So: CPU torch==2.13.0
# first (the local CPU build), then sae-bench under a constraint that keeps that torch, then
# torchvision is removed: the only torchvision that accepts torch 2.13.0 is a CUDA (+cu130) build, and
# beside a CPU torch it breaks `import transformer_lens` ("operator torchvision::nms does not exist");
# no SAEBench evaluation that evaluate runs imports it (`pip check` then lists it as missing, harmless).
# The project itself is not installed here: the worker runs from the checkout (PYTHONPATH) and imports
# only sae_bench, sae_lens, transformer_lens and torch.
#
# Idempotent: a venv whose stamp matches this script is left as it is.
# Environment: PYTHON (interpreter to build the venv from, default python3), FAST_SAE_SAEBENCH_VENV
# (venv folder, default .venv-saebench).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${FAST_SAE_SAEBENCH_VENV:-.venv-saebench}
STAMP="$VENV/.fast-sae-setup"
WANT="$(sha256sum setup_saebench.sh | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import sae_bench" >/dev/null 2>&1; then
  echo "SAEBench venv ready: $VENV (up to date)"
  exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
vpip() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"
vpip install --quiet --upgrade pip
vpip install --quiet "torch==2.13.0"
vpip install --quiet -c "$CONSTRAINTS" "sae-bench==0.6.0"
vpip uninstall --quiet -y torchvision
"$VPY" -c "import torch, sae_bench, sae_lens, transformer_lens, sae_probes; assert '+cu' not in torch.__version__, torch.__version__; print('sae-bench ready: torch', torch.__version__, 'sae_lens', sae_lens.__version__)"
echo "$WANT" > "$STAMP"
echo "SAEBench venv ready: $VENV in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1)"
