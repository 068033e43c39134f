"""Acceptance: the README's demo experiment learns, transfers, shards over 2 ZeRO ranks and lands in MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # CPU ranks on any machine: two ZeRO ranks over gloo (tests/gpu/test_demo.py runs it on the GPUs).
    result = run_mixer(
        "run", str(REPO / "configs" / "demo.yaml"), f"output_dir={tmp_path}/out", "launch.device=cpu",
        env={"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    stages = tmp_path / "out" / "stages"
    assert list((stages / "pretrain" / "checkpoints").glob("*/zero_pp_rank_1_*"))  # two ZeRO ranks wrote shards

    final = json.loads((stages / "eval" / "result.json").read_text())
    assert final["eval/samples"] == 1000
    assert final["eval/top1"] >= 0.90, final  # the fine-tuned model on held-out shapes it never pre-trained on

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and sorted(children) == ["eval", "finetune", "pretrain"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    for stage in ("pretrain", "finetune"):
        metrics = children[stage].data.metrics
        assert {"train/loss", "train/lr", "train/img_per_s", "eval/top1", "eval/top5"} <= set(metrics)
    assert children["eval"].data.metrics["eval/top1"] == pytest.approx(final["eval/top1"])
    losses = [m.value for m in client.get_metric_history(children["pretrain"].info.run_id, "train/loss")]
    assert losses[-1] < 0.75 * losses[0]  # pre-training itself learns
