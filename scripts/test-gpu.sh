#!/usr/bin/env bash
# The GPU test lane: the tests marked `gpu` (tests/gpu), on a machine with a CUDA device. The CPU suite
# (scripts/test.sh, what CI runs) deselects them and says how many.
#
#   bash scripts/test-gpu.sh [pytest arguments]
#
# Installs what the machine lacks first, as scripts/test.sh does: a virtual environment .venv-gpu with the PyTorch
# release this lane is tested with (TESTED_TORCH; docker/Dockerfile's base image ships the same one) and the
# project. On a machine without a package index, WHEELHOUSE=<a folder of wheels> keeps the machine's own python3 and
# its CUDA PyTorch, and installs the folder's wheels as they are (no dependency resolution) into a folder beside them.
# GPU_TEST_WORKERS test modules run at a time (default 4; they share the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
TESTED_TORCH=2.11.0
TESTED_TORCHVISION=0.26.0
if [ -n "${WHEELHOUSE:-}" ]; then
  python=${PYTHON:-python3}
  site=${GPU_SITE:-/tmp/mixer-gpu-site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELHOUSE"/*.whl
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
  EXTRAS=dev,gpu,bench VENV=.venv-gpu TORCH_SPEC="torch==$TESTED_TORCH torchvision==$TESTED_TORCHVISION" bash scripts/setup.sh
  python=.venv-gpu/bin/python
fi
"$python" - "$TESTED_TORCH" <<'EOF_PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"scripts/test-gpu.sh: PyTorch {torch.__version__} sees no CUDA device on this machine")
print(f"GPU lane: torch {torch.__version__} on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
if torch.__version__.split("+")[0] != sys.argv[1]:
    print(f"GPU lane: note: tested with torch {sys.argv[1]}, this machine has {torch.__version__}")
EOF_PY
exec "$python" -m pytest -m gpu tests/gpu -n "${GPU_TEST_WORKERS:-4}" --dist loadfile "$@"
