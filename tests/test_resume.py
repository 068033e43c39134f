"""SIGKILL in the middle of a stage, then the same command again: the final weights are bit-identical to an
uninterrupted run's, and so is every loss logged after the resume point (data position and randomness replay).
A checkpoint written by 2 ranks resumes on 1 and on 3."""

import os
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline import checkpoint
from pipeline.engine import consolidated_state_dict
from tests.conftest import REPO, run_mixer, stage_losses

pytestmark = pytest.mark.slow
CONFIG = REPO / "tests" / "configs" / "resume.yaml"


def _args(tmp, name):
    return ["run", str(CONFIG), f"output_dir={tmp}/{name}", f"datasets.shapes.path={tmp}/shapes"]


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
    checkpoints = stage / "checkpoints"
    deadline = time.time() + 300
    # Killed at the first complete checkpoint (step 4 or soon after): on a fast machine `latest` can move on
    # between two looks, so waiting for one particular step races the end of the stage.
    while checkpoint.latest_tag(checkpoints) is None:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    # No warning, no save: every process of the run (launcher, torchrun, ranks, loader workers) dies at once.
    subprocess.run(["pkill", "-KILL", "-f", f"{tmp_path}/killed"], check=False)
    proc.wait(timeout=60)
    assert not (stage / "result.json").exists()
    tag = checkpoint.latest_tag(checkpoints)
    resume_step = next((step for step in range(4, 24, 4) if checkpoint.tag_for(step) == tag), None)
    assert resume_step is not None, tag  # a checkpoint of this run (every 4 steps), not its end

    # Without `latest` (deleted by hand), the rerun finds the newest checkpoint that verifies all the same.
    (checkpoints / "latest").unlink()
    resumed = run_mixer(*_args(tmp_path, "killed"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumes from {tag}" in resumed.stderr and "latest is missing" in resumed.stderr
    run = MlflowClient(uri).get_run((stage / "run_id").read_text().strip())
    assert run.data.tags["resumed_from"].endswith(tag)

    a = load_file(tmp_path / "straight" / "stages" / "pretrain" / "model.safetensors")
    b = load_file(stage / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight_losses = stage_losses(uri, tmp_path / "straight" / "stages" / "pretrain")
    killed_losses = stage_losses(uri, stage)
    assert sorted(straight_losses) == list(range(1, 25))
    # Steps logged between the checkpoint and the kill are not logged again when the resume replays them.
    logged = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(logged) == list(range(1, 25)), logged
    after = [s for s in straight_losses if s > resume_step]
    assert [killed_losses[s] for s in after] == [straight_losses[s] for s in after]


def test_a_two_rank_checkpoint_resumes_on_one_and_on_three_ranks(tmp_path):
    """World-size change: the 2-rank checkpoint is converted to DeepSpeed's universal format and loaded whole (the
    weights exactly), then training continues on the new number of ranks with the same global batch."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri}
    batch = ["stages.pretrain.grad_accum=null", "stages.pretrain.global_batch=96"]  # 16 x {1,2,3} ranks x {6,3,2}
    straight = run_mixer(*_args(tmp_path, "straight"), *batch, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoints = tmp_path / "straight" / "stages" / "pretrain" / "checkpoints"
    source = checkpoints / "step-00000016"

    # 3 ranks, no step left to take: the stage loads step 16 and exports it, so the weights must be the checkpoint's.
    three = run_mixer(
        *_args(tmp_path, "three"),
        *batch,
        "launch.nproc_per_node=3",
        "stages.pretrain.steps=16",
        f"stages.pretrain.resume_from={source}",
        env=env,
    )
    assert three.returncode == 0, three.stderr[-3000:]
    assert (source / "universal" / "zero").is_dir()
    saved = consolidated_state_dict(checkpoints, "step-00000016")
    loaded = load_file(tmp_path / "three" / "stages" / "pretrain" / "model.safetensors")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    # 1 rank: continues from step 17 to the end of the schedule, in the same global batches of 96.
    one = run_mixer(
        *_args(tmp_path, "one"), *batch, "launch.nproc_per_node=1", f"stages.pretrain.resume_from={source}", env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    stage = tmp_path / "one" / "stages" / "pretrain"
    run = MlflowClient(uri).get_run((stage / "run_id").read_text().strip())
    assert run.data.tags["resumed_world_size"].startswith("2 -> 1 ranks")
    assert sorted(stage_losses(uri, stage)) == list(range(17, 25))
    straight_run = (tmp_path / "straight" / "stages" / "pretrain" / "run_id").read_text().strip()
    # The schedule continued at step 17: the last learning rate is the uninterrupted run's, not 8 steps into warm-up.
    assert run.data.metrics["train/lr"] == MlflowClient(uri).get_run(straight_run).data.metrics["train/lr"]
    final = load_file(stage / "model.safetensors")
    assert any(not torch.equal(final[k], saved[k]) for k in saved)


def test_a_failing_final_evaluation_keeps_the_training_and_a_rerun_only_evaluates(tmp_path):
    """The stage saves its last step before its final evaluation: with the default checkpoint_every 0 a failure
    there used to throw the whole stage's training away."""
    import json

    from pipeline.data import synthetic

    shapes = tmp_path / "shapes"
    synthetic.write_dataset("shapes", shapes / "train", samples=400, size=16, seed=0)
    synthetic.write_dataset("shapes", shapes / "eval", samples=64, size=16, seed=1)
    index = shapes / "eval" / "index.json"
    good = index.read_text()
    broken = json.loads(good)
    for shard in broken["shards"]:
        shard["num_samples"] = 0  # the evaluation then reads more batches than the index allows, and stops
    index.write_text(json.dumps(broken))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*_args(tmp_path, "run"), "stages.pretrain.checkpoint_every=0", "stages.pretrain.checkpoint_async=false"]
    failed = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert failed.returncode != 0 and "more than the index allows" in failed.stderr, failed.stderr[-3000:]
    stage = tmp_path / "run" / "stages" / "pretrain"
    # What failed, where, in one line per rank and one for the stage; the tracebacks go to files, not the console.
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("mixer: error: stage 'pretrain' failed (exit status 1): rank ") and "RuntimeError" in last
    assert "Traceback" in (stage / "errors" / "rank00000.txt").read_text()
    assert checkpoint.latest_tag(stage / "checkpoints") == checkpoint.tag_for(24)  # the training is kept
    assert not (stage / "result.json").exists()

    index.write_text(good)
    rerun = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = MlflowClient(uri).get_run((stage / "run_id").read_text().strip())
    assert run.data.tags["resumed_from"].endswith(checkpoint.tag_for(24)) and "eval/top1" in run.data.metrics
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 25))  # no step trained (or logged) twice
