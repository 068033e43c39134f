"""`mixer submit` against a real one-node Slurm cluster (slurmctld + slurmd + munge, Debian's packages, started here
as root): stages run as chained jobs, MLflow ends up as after `mixer run`, a failure stops the chain."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.dist import free_port
from tests.conftest import REPO, apt_install, run_mixer

pytestmark = pytest.mark.slow
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}


def _install_missing() -> None:
    apt_install(*[pkg for binary, pkg in {**PACKAGES, "shellcheck": "shellcheck"}.items() if not shutil.which(binary)])


SLURM_CONF = """\
ClusterName=mixertest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster on 127.0.0.1; yields the environment that points the Slurm commands at it."""
    _install_missing()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    # Free ports, not fixed ones: daemons left over by a killed test run must not answer this cluster's commands
    ctld_port = free_port()
    slurmd_port = next(port for port in iter(free_port, None) if port != ctld_port)
    ports = {"ctld_port": ctld_port, "slurmd_port": slurmd_port}
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=root, cpus=os.cpu_count(), **ports))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout:
        assert time.time() < deadline, (root / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield env
    subprocess.run(["scancel", "--full", "--user", "root"], env=env)
    deadline = time.time() + 30
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env).stdout and time.time() < deadline:
        time.sleep(0.5)
    pids = [(root / f"{daemon}.pid").read_text().strip() for daemon in ("slurmd", "slurmctld")]
    subprocess.run(["kill", *pids])
    time.sleep(2)
    subprocess.run(["kill", "-KILL", *pids], capture_output=True)  # those that did not stop yet


def _job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait(env: dict, job_ids: list[str], done, timeout: float = 1200) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    while True:
        jobs = [_job(env, j) for j in job_ids]
        if done(jobs):
            return jobs
        assert time.time() < deadline, jobs
        time.sleep(1)


def _submit(tmp_path: Path, env: dict, *extra: str) -> list[str]:
    result = run_mixer(
        "submit", str(TINY), f"output_dir={tmp_path}/out", f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel", f"cluster.python={sys.executable}", *extra,
        env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.split("│")[3].strip() for line in result.stdout.splitlines() if ".sbatch" in line]


def test_rendered_job_files_are_valid_shell(tmp_path, slurm):
    result = run_mixer(
        "submit", str(TINY), "--to", "print", f"output_dir={tmp_path}/out", f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel", "cluster.gpus_per_node=8", "launch.nproc_per_node=auto",
        "cluster.partition=gpu", "cluster.stages.pretrain.nodes=4", "cluster.env.NCCL_SOCKET_IFNAME=lo",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "out" / "jobs").glob("*.sbatch"))
    assert [p.stem for p in scripts] == ["eval", "finetune", "pretrain"]
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        check = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    pretrain = (tmp_path / "out" / "jobs" / "pretrain.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "--requeue",
                 "export NCCL_SOCKET_IFNAME=lo", "--nproc-per-node 8"):  # fmt: skip
        assert line in pretrain
    assert "#SBATCH --nodes=1" in (tmp_path / "out" / "jobs" / "eval.sbatch").read_text()
    assert "--last" in (tmp_path / "out" / "jobs" / "eval.sbatch").read_text() and "--last" not in pretrain


def test_submitted_stages_survive_a_requeue_complete_in_order_and_track_like_mixer_run(tmp_path, slurm):
    longer = ["stages.pretrain.steps=40", "stages.pretrain.checkpoint_every=5"]
    ids = _submit(tmp_path, slurm, *longer)
    assert len(ids) == 3
    # Preempt pre-training once it has a checkpoint: Slurm stops the job (SIGTERM) and queues it again.
    latest = tmp_path / "out" / "stages" / "pretrain" / "checkpoints" / "latest"
    _wait(
        slurm,
        ids[:1],
        lambda jobs: latest.exists() or jobs[0]["JobState"] != "RUNNING" and jobs[0]["JobState"] != "PENDING",
    )
    assert _job(slurm, ids[0])["JobState"] == "RUNNING", "pre-training ended before it could be requeued"
    subprocess.run(["scontrol", "requeue", ids[0]], check=True, env=slurm)
    # Slurm holds a requeued job back for a while (reason BeginTime); as an administrator may, let it start now.
    back = ("PENDING", "RUNNING", "COMPLETED")
    (job,) = _wait(slurm, ids[:1], lambda jobs: int(jobs[0]["Restarts"]) > 0 and jobs[0]["JobState"] in back)
    if job["JobState"] == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={ids[0]}", "StartTime=now"], check=True, env=slurm)

    jobs = _wait(slurm, ids, lambda jobs: all(j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") for j in jobs))
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 3, jobs
    assert int(jobs[0]["Restarts"]) >= 1
    for before, after in zip(jobs, jobs[1:]):
        assert before["EndTime"] <= after["StartTime"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == ["eval", "finetune", "pretrain"]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in children.values())  # fmt: skip
    assert "eval/eval/top1" in parents[0].data.metrics  # the stages' summaries, as `mixer run` logs them
    # The requeued job went on in the same MLflow run, from its checkpoint: every logged step once.
    pretrain = children["pretrain"]
    log = (tmp_path / "out" / "jobs" / f"pretrain-{ids[0]}.log").read_text()
    assert "saved a checkpoint and stopped; requeueing" in log, log[-4000:]
    assert pretrain.data.tags["resumed"] == "true" and "preempted_at_step" in pretrain.data.tags, log[-4000:]
    steps = [m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(2, 41, 2))


def test_a_failing_stage_leaves_the_later_ones_never_run(tmp_path, slurm):
    # Valid as a config; the job's ranks, on nodes without a GPU, refuse it when they start.
    ids = _submit(tmp_path, slurm, "data.decode=gpu")
    jobs = _wait(slurm, ids, lambda jobs: jobs[0]["JobState"] == "FAILED" and jobs[1]["Reason"] != "Dependency")
    # The next stage can never start; the one after it waits on that one, so it never starts either.
    assert [(j["JobState"], j["Reason"]) for j in jobs[1:]] == [
        ("PENDING", "DependencyNeverSatisfied"),
        ("PENDING", "Dependency"),
    ]
    log = next((tmp_path / "out" / "jobs").glob("pretrain-*.log")).read_text()
    assert "mixer: error: data.decode=gpu needs a CUDA device" in log
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = (tmp_path / "out" / "parent_run_id").read_text().strip()
    assert client.get_run(parent_id).info.status == "FAILED"


def test_names_are_checked_and_rendered_values_quoted(tmp_path):
    """A stage named `pre train$(id)` is refused; an output folder with shell characters in its name lands in the
    job script as one quoted word, so the shell runs nothing it holds."""
    for bad in ("stages.pretrain.name=pre train$(id)", "name=x;id", "cluster.env={'A B': '1'}"):
        with pytest.raises(ConfigError, match="'name'|'stages\\[0\\]\\.name'|'cluster.env' key"):
            load_config(TINY, [bad])
    out = tmp_path / "o$(touch PWNED)"
    result = run_mixer(
        "submit", str(TINY), "--to", "print", f"output_dir={out}", f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = (out / "jobs" / "pretrain.sbatch").read_text()
    srun = script[script.index("srun ") : script.index("launcher=$!")].replace("\\\n", " ")
    words = shlex.split(srun)
    assert words[words.index("stage") + 1] == str(out / "config.yaml")  # one literal word
    assert shlex.quote(str(out / "stages" / "pretrain" / "preempted")) in script


def test_a_built_wheel_carries_the_job_templates(tmp_path):
    """`pip wheel .` installed outside the checkout (no editable link back to it) renders the demo's job files."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", tmp_path / "dist"],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("mixer_pipeline-*.whl"))
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", tmp_path / "site", wheel], check=True,
                   capture_output=True)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", str(REPO / "configs" / "demo.yaml"), "--to", "print",
         f"output_dir={tmp_path}/out"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "#SBATCH" in (tmp_path / "out" / "jobs" / "pretrain.sbatch").read_text()
