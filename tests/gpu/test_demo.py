"""The README's demo on a GPU machine, unchanged but for the GPU settings users turn on: one rank per GPU, nvJPEG
decode with the augmentation on the GPU, torch.compile and bf16 autocast."""

import json

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_mixer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
STAGES = ("pretrain", "finetune", "eval")


def test_demo_end_to_end_on_the_gpu_with_gpu_decode_compile_and_autocast(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_mixer(
        "run", str(REPO / "configs" / "demo.yaml"), f"output_dir={tmp_path}/out",
        f"datasets.shapes.path={tmp_path}/shapes", f"datasets.novel_shapes.path={tmp_path}/novel",
        "data.decode=gpu", "deepspeed.compile=true", "deepspeed.precision=autocast",
        env={"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["launch"]["nproc_per_node"] == torch.cuda.device_count()  # auto: one rank per GPU

    results = {s: json.loads((tmp_path / "out" / "stages" / s / "result.json").read_text()) for s in STAGES}
    final = results["eval"]
    assert final["eval/samples"] == 1000
    # Every stage's numbers on failure: the loss, skipped steps and bad samples tell a data fault from a step fault.
    assert final["eval/top1"] >= 0.90, json.dumps(results, indent=1)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for stage in STAGES[:2]:
        run = children[stage]
        assert run.data.tags["launch/device"] == "cuda"
        assert run.data.metrics["train/mfu"] > 0 and run.data.metrics["train/peak_mem_gib"] > 0
