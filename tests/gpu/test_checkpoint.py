"""Checkpoints of a GPU run: written in the background from device memory (`checkpoint_async`), killed at any
moment, resumed exactly; and consolidated on the CPU into the same weights the GPU run exported."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.engine import consolidated_state_dict
from tests.conftest import REPO, run_mixer
from tests.gpu.conftest import GPU_CONFIG, StageRun, run_gpu_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
STEPS = 400
ASYNC = [
    f"stages.pretrain.steps={STEPS}",
    "stages.pretrain.checkpoint_every=50",
    "stages.pretrain.checkpoint_async=true",
    "stages.pretrain.log_every=10",
]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, gpu_shapes):
    return run_gpu_config(tmp_path_factory.mktemp("straight"), "straight", gpu_shapes, *ASYNC)


def test_async_checkpoint_from_device_memory_resumes_exactly(tmp_path, gpu_shapes, straight):
    """SIGKILL once the first background checkpoint is complete (the next one may be half written), then the same
    command: the final weights and every loss after the resume point are the uninterrupted run's, bit for bit."""
    out = tmp_path / "killed"
    args = ["run", str(GPU_CONFIG), f"output_dir={out}", f"datasets.shapes.path={gpu_shapes}", *ASYNC]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stderr=subprocess.PIPE)
    checkpoints = out / "stages" / "pretrain" / "checkpoints"
    deadline = time.time() + 300
    while checkpoint.latest_tag(checkpoints) is None:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    subprocess.run(["pkill", "-KILL", "-f", str(out)], check=False)
    proc.wait(timeout=60)
    tag = checkpoint.latest_tag(checkpoints)
    resume_step = next((s for s in range(50, STEPS, 50) if checkpoint.tag_for(s) == tag), None)
    assert resume_step is not None, tag  # killed mid-stage, not at its end

    resumed = run_mixer(*args, env={"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]})
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    stage = out / "stages" / "pretrain"
    assert _equal(load_file(stage / "model.safetensors"), load_file(straight.stage / "model.safetensors"))
    reference = straight.losses()
    losses = StageRun(out, env["MLFLOW_TRACKING_URI"], "").losses()
    after = [s for s in reference if s > resume_step]
    assert after and [losses[s] for s in after] == [reference[s] for s in after]


def test_export_on_the_cpu_equals_the_gpu_runs_export(tmp_path, straight):
    """`mixer export` with no GPU visible consolidates the GPU run's last checkpoint into exactly the weights the
    run exported from device memory at its end."""
    out = tmp_path / "cpu.safetensors"
    result = run_mixer("export", str(straight.stage), str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    on_gpu = load_file(straight.stage / "model.safetensors")
    assert _equal(load_file(out), on_gpu)
    last = checkpoint.latest_tag(straight.stage / "checkpoints")
    assert last == checkpoint.tag_for(STEPS)
    assert _equal(consolidated_state_dict(straight.stage / "checkpoints", last), on_gpu)
