#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs the demo experiment end to end: generated shapes ->
# DeepSpeed ZeRO-2 pre-training on 2 ranks -> fine-tuning on unseen shapes -> evaluation, tracked in MLflow.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh output_dir=/tmp/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mixer run configs/demo.yaml "$@"
