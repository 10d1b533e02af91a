#!/usr/bin/env bash
# Set up vitlab in ./.venv: PyTorch (from the pinned wheels), vitlab in editable mode with its
# test extras. Safe to run again: an existing, complete environment is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VITLAB_VENV:-.venv}
TORCH_SPEC=${VITLAB_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "vitlab needs Python >= 3.10; '$PY' is $("$PY" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q $TORCH_SPEC
fi
if ! "$VENV/bin/python" -c 'import vitlab, pytest, torchmetrics, vit_pytorch, imagecorruptions' 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.vitlab-installed" ]; then
    echo "[setup] installing vitlab (editable) with test extras"
    "$VENV/bin/pip" install -q -e ".[test]"
    touch "$VENV/.vitlab-installed"
fi
echo "[setup] ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
