"""SIGTERM during pre-training: every rank saves, `mixer run` exits for a requeue, and the same command resumes the
same MLflow run from that checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.stages import REQUEUE_EXIT
from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow


def test_sigterm_saves_exits_for_requeue_and_the_rerun_continues(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "run",
        str(REPO / "tests" / "configs" / "tiny.yaml"),
        f"output_dir={tmp_path}/out",
        f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel",
        "stages.pretrain.steps=400",
        "stages.pretrain.checkpoint_every=1000",
        "stages.pretrain.eval_every=0",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stage_dir = tmp_path / "out" / "stages" / "pretrain"
    deadline = time.time() + 300
    while not (stage_dir / "run_id").exists():  # the stage's ranks are up and its MLflow run exists
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    time.sleep(6)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == REQUEUE_EXIT, out[-2000:] + err[-3000:]
    assert "run the same command again to resume" in err

    step = int((stage_dir / "preempted").read_text())
    assert 0 < step < 400
    assert (stage_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert list((stage_dir / "checkpoints" / f"step-{step:08d}").glob("zero_pp_rank_1_*"))
    run_id = (stage_dir / "run_id").read_text().strip()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["preempted_at_step"] == str(step)

    again = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (stage_dir / "preempted").exists()
    run = client.get_run(run_id)  # the same run continued
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(steps) and steps[-1] == 400
    assert any(s <= step for s in steps) and any(s > step for s in steps)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 4  # one parent, three stages: nothing was started twice
