#!/usr/bin/env bash
# The second TopK peer of bench/train.py: EleutherAI sparsify (PyPI eai-sparsify 1.3.3) in its own venv,
# .venv-sparsify/, on top of the main Python's packages (--system-site-packages: the CPU torch, transformers,
# SAELens are shared, so nothing pulls another torch); only sparsify and its few small dependencies land
# in the venv. torch is pinned to the main Python's build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sparsify
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sparsify" >/dev/null 2>&1; then
  echo "sparsify venv ready: $VENV"; exit 0
fi
"$PY" -m venv --system-site-packages "$VENV"
TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$VENV/bin/python" -m pip install --quiet "eai-sparsify==1.3.3" "torch==$TORCH" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import sparsify, torch; print('sparsify venv ready:', torch.__version__)"
