#!/usr/bin/env bash
# The multi-GPU measurements of docs/BENCHMARKS.md, on one node with several GPUs:
#   allreduce  NCCL all-reduce bus bandwidth over all the node's GPUs (the reference for communication cost)
#   scale      weak scaling of Mixer-L/16 pre-training from JPEG shards (configs/bench/scale_l16.yaml)
#   resume     a run on N GPUs stopped by SIGTERM after its first checkpoint, then the same command on N/2 GPUs
# usage: bash scripts/bench_multigpu.sh OUT_DIR [GPU_COUNT ...]   (default: 1 2 4 8, up to the node's GPUs)
# env: PARTS="allreduce scale resume"  ZERO="2 3"  WORK=/tmp/mixer-bench (runs and generated data)
#      PYTHON=python3 (with the project importable)  NGPUS (default: all of the node's)
#      CONFIG, DATA: another experiment and its data override (default: the L/16 benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
mkdir -p "$out"
python=${PYTHON:-python3}
mixer="$python -m pipeline"
work=${WORK:-/tmp/mixer-bench}
parts=${PARTS:-"allreduce scale resume"}
n=${NGPUS:-$($python -c 'import torch; print(torch.cuda.device_count())')}
gpus=("$@")
if [ ${#gpus[@]} -eq 0 ]; then
  for g in 1 2 4 8; do [ "$g" -le "$n" ] && gpus+=("$g"); done
fi
config=${CONFIG:-configs/bench/scale_l16.yaml}
data=${DATA:-"datasets.photos.path=$work/photos"}

if [[ $parts == *allreduce* ]]; then
  # shellcheck disable=SC2086
  $mixer bench allreduce --ranks "$n" --sizes 1 16 256 1024 --json "$out/allreduce.json"
fi
if [[ $parts == *scale* ]]; then
  # shellcheck disable=SC2086
  $mixer bench scale $config $data --ranks "${gpus[@]}" --zero ${ZERO:-2 3} --workdir "$work/scale" \
    --json "$out/scale.json" >"$out/scale.log" 2>&1
  echo "scale: exit $?"
  grep -v "step/s" "$out/scale.log" | tail -n 12
fi
if [[ $parts == *resume* ]]; then
  half=$((n / 2))
  run="$config $data output_dir=$work/resume stages.pretrain.global_batch=$((128 * n)) deepspeed.zero_stage=2 stages.pretrain.steps=40
       stages.pretrain.checkpoint_every=20 stages.pretrain.checkpoint_keep=0 stages.pretrain.log_every=10"
  # shellcheck disable=SC2086
  $mixer run $run launch.nproc_per_node="$n" >"$out/resume-$n.log" 2>&1 &
  pid=$!
  latest=$work/resume/stages/pretrain/checkpoints/latest
  while [ ! -f "$latest" ] && kill -0 "$pid" 2>/dev/null; do sleep 1; done
  kill -TERM "$pid"
  wait "$pid"
  echo "resume: stopped on $n GPUs with exit $? (75: checkpoint saved, run again)"
  # shellcheck disable=SC2086
  $mixer run $run launch.nproc_per_node="$half" >"$out/resume-$half.log" 2>&1
  echo "resume: the same command on $half GPUs: exit $?"
  $python - "$work/resume/stages/pretrain" <<'PY' | tee "$out/resume.txt"
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
stage = Path(sys.argv[1])
for manifest in sorted(stage.glob("checkpoints/step-*/manifest.json")):
    data = json.loads((manifest.parent / "data" / "rank00000.json").read_text())
    print(f"{manifest.parent.name}: written by {json.loads(manifest.read_text())['world_size']} ranks, "
          f"global sample {data['global_samples']}, epoch {data['epoch']} batch {data['position']}")
client = MlflowClient()
run = client.get_run((stage / "run_id").read_text().strip())
print("MLflow run", run.info.run_id, run.info.status, {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})
print("train/loss logged at steps", [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")])
PY
fi
