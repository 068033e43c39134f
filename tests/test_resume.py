"""SIGKILL in the middle of a stage, then the same command again: the final weights are bit-identical to an
uninterrupted run's, and so is every loss logged after the resume point (data position and randomness replay)."""

import os
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow
CONFIG = REPO / "tests" / "configs" / "resume.yaml"


def _args(tmp, name):
    return ["run", str(CONFIG), f"output_dir={tmp}/{name}", f"datasets.shapes.path={tmp}/shapes"]


def _losses(uri, stage_dir):
    run_id = (stage_dir / "run_id").read_text().strip()
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    return {m.step: m.value for m in history}


def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri}
    straight = run_mixer(*_args(tmp_path, "straight"), env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *_args(tmp_path, "killed")],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stage = tmp_path / "killed" / "stages" / "pretrain"
    deadline = time.time() + 300
    while (
        not (stage / "checkpoints" / "latest").exists()
        or "00000012" not in (stage / "checkpoints" / "latest").read_text()
    ):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    # No warning, no save: every process of the run (launcher, torchrun, ranks, loader workers) dies at once.
    subprocess.run(["pkill", "-KILL", "-f", f"{tmp_path}/killed"], check=False)
    proc.wait(timeout=60)
    assert not (stage / "result.json").exists()

    resumed = run_mixer(*_args(tmp_path, "killed"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(tmp_path / "straight" / "stages" / "pretrain" / "model.safetensors")
    b = load_file(stage / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight_losses = _losses(uri, tmp_path / "straight" / "stages" / "pretrain")
    killed_losses = _losses(uri, stage)
    assert sorted(straight_losses) == list(range(1, 25))
    after = [s for s in straight_losses if s > 12]
    assert [killed_losses[s] for s in after] == [straight_losses[s] for s in after]
