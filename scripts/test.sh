#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs lint and the whole test suite, slow tests included.
# Test modules run two at a time (pytest-xdist; a module's tests stay together, in order, on one worker), in the
# order tests/conftest.py gives them: the slow ones first.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`, or `-n 0` for one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
