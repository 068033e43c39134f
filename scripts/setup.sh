#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs PyTorch, then the project with its dependencies and dev tools.
# TORCH_SPEC picks the PyTorch build (default: the release the CPU suite is tested with); EXTRAS, the project's
# extras (default dev; the GPU lane adds gpu and bench).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# PyTorch first and pinned, so that the project's `torch>=` range is already met and pip fetches no other build.
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]" 2> >(grep -v "is ignored" >&2)
