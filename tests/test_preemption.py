"""A run stopped from outside: SIGTERM during pre-training (every rank saves, `mixer run` exits for a requeue, the
same command resumes the same MLflow run), a second `mixer run` of the same output_dir (refused, naming the first),
SIGKILL of `mixer run` itself (its launcher and ranks save and stop rather than train on as orphans), and SIGTERM
during the last stage, an evaluation, which finishes its work (nothing is reported failed)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.stages import REQUEUE_EXIT, OutputLock
from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow


def _start(args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, text=True, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for(condition, proc: subprocess.Popen, log, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail(f"{what}: not seen (exit {proc.poll()}): {log.read()[-3000:]}")
        time.sleep(0.3)


def test_a_stopped_run_saves_and_the_same_command_continues_it(tmp_path):
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
    # Time for the evaluation to finish after a stop signal, however loaded the machine is.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    stage_dir = tmp_path / "out" / "stages" / "pretrain"
    client = MlflowClient(uri)

    # 1. SIGTERM while pre-training: a checkpoint, exit for a requeue. A second run meanwhile is refused.
    with open(tmp_path / "first.log", "w+") as log:
        proc = _start(args, env, log)
        _wait_for((stage_dir / "run_id").exists, proc, log, "the stage's MLflow run")
        second = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
        assert second.returncode == 2 and f"is in use by pid {proc.pid} on " in second.stderr, second.stderr
        time.sleep(4)  # inside the training loop
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        log.seek(0)
        out = log.read()
    assert proc.returncode == REQUEUE_EXIT, out[-3000:]
    assert "run the same command again to resume" in out
    step = int((stage_dir / "preempted").read_text())
    assert 0 < step < 400
    assert (stage_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert list((stage_dir / "checkpoints" / f"step-{step:08d}").glob("zero_pp_rank_1_*"))
    run_id = (stage_dir / "run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["preempted_at_step"] == str(step)

    # 2. SIGKILL of `mixer run` once the resumed stage trains: its launcher and ranks save and stop by themselves.
    def trains_past(mark: int) -> bool:
        return any(m.step > mark for m in client.get_metric_history(run_id, "train/loss"))

    with open(tmp_path / "second.log", "w+") as log:
        proc = _start(args, env, log)
        _wait_for(lambda: trains_past(step), proc, log, f"training past step {step}")
        below = psutil.Process(proc.pid).children(recursive=True)
        assert len(below) >= 3  # the launcher and two ranks
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(below, timeout=180)
        assert not alive, [p.cmdline() for p in alive]
    lock = OutputLock(tmp_path / "out", "test")  # free again
    os.close(lock.fd)
    later = int((stage_dir / "preempted").read_text())
    assert step < later < 400 and (stage_dir / "checkpoints" / "latest").read_text().strip() == f"step-{later:08d}"

    # 3. The same command again, with SIGTERM during the last stage: its evaluation finishes, and so does the run.
    eval_dir = tmp_path / "out" / "stages" / "eval"
    with open(tmp_path / "third.log", "w+") as log:
        proc = _start(args, env, log)
        _wait_for((eval_dir / "run_id").exists, proc, log, "the evaluation's MLflow run", timeout=600)
        assert not (eval_dir / "result.json").exists()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=400)
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, out[-3000:]
    assert (eval_dir / "result.json").exists() and "failed" not in out.lower()
    run = client.get_run(run_id)  # the same run continued
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # each step once, through two resumes
    assert any(s <= step for s in steps) and any(step < s <= later for s in steps) and any(s > later for s in steps)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 4  # one parent, three stages: nothing was started twice
    assert {r.info.status for r in runs} == {"FINISHED"}, [
        (r.data.tags.get("mlflow.runName"), r.info.status) for r in runs
    ]


def test_a_stop_signal_before_the_training_loop_is_kept_as_a_request():
    # As `mixer stage` does first thing: SIGTERM during set-up (or while a failing rank closes its runs, when torchrun
    # stops the other ranks) must not end the process there.
    script = """
import os, signal, time
from pipeline.preemption import Preemption
Preemption.catch()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print(Preemption().requested)  # the runner's instance, made later, still sees it
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
