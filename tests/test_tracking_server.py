"""MLflow over HTTP: a real `mlflow server` with a real PostgreSQL backend (Debian's postgresql, started here on
loopback as the `postgres` user). Two runs at once keep apart; a server that stops for 60 s during training holds
the metrics back, it does not stop training, and they all arrive once it is back."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, apt_install

pytestmark = pytest.mark.slow
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PG_PORT, MLFLOW_PORT = 15432, 15123


def _pg_bin() -> Path:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        apt_install("postgresql")
    return sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1].parent


def _as_postgres(*cmd: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)


@pytest.fixture(scope="module")
def postgres():
    """A fresh PostgreSQL cluster on 127.0.0.1:15432 with an `mlflow` database; yields its SQLAlchemy URI."""
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="mixer-postgres-"))  # not under pytest's root-only tmp: postgres owns it
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    _as_postgres(
        str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start",
        "-o", f"-p {PG_PORT} -k {root} -c listen_addresses=127.0.0.1",
    )  # fmt: skip
    _as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(PG_PORT), "mlflow")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{PG_PORT}/mlflow"
    _as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
    shutil.rmtree(root, ignore_errors=True)


class Server:
    """`mlflow server` on loopback with the PostgreSQL store and proxied artifacts; can be stopped and started."""

    def __init__(self, store: str, artifacts: Path, log: Path) -> None:
        self.store, self.artifacts, self.log = store, artifacts, log
        self.uri = f"http://127.0.0.1:{MLFLOW_PORT}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
            "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
            "--workers", "1",
        ]  # fmt: skip
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    srv = Server(postgres, root / "artifacts", root / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _mixer_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run", str(TINY), f"output_dir={out}", f"datasets.shapes.path={data}/shapes",
        f"datasets.novel.path={data}/novel", *extra,
    ]  # fmt: skip


def test_two_runs_at_once_over_http_keep_their_own_runs(server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONUNBUFFERED": "1", "NCCL_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                *_mixer_args(tmp_path / f"run{i}", tmp_path / f"data{i}", "launch.nproc_per_node=1", "name=shared"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("shared")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "experiment"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["stage"] for r in children) == ["eval", "finetune", "pretrain"]
        pretrain = next(r for r in children if r.data.tags["stage"] == "pretrain")
        assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")] == [2, 4, 6]
        assert pretrain.data.metrics["eval/top1"] >= 0
        # each stage run records where it ran and with which communication settings
        assert pretrain.data.tags["launch/world_size"] == "1" and pretrain.data.tags["env/NCCL_SOCKET_IFNAME"] == "lo"
        # artifacts went through the server into its artifact store
        assert "model" in [a.path for a in client.list_artifacts(pretrain.info.run_id)]


def test_training_goes_on_while_the_server_is_down_and_the_metrics_arrive_later(server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONUNBUFFERED": "1"}
    args = _mixer_args(
        tmp_path / "out", tmp_path / "data", "launch.nproc_per_node=1", "name=outage",
        "stages.pretrain.steps=100000", "stages.pretrain.log_every=1", "stages.pretrain.eval_every=0",
        "stages.pretrain.checkpoint_every=0",
    )  # fmt: skip
    log = (tmp_path / "mixer.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stdout=log, stderr=log)
    client = MlflowClient(server.uri)

    def pretrain_run():
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'") if experiment else []
        return runs[0] if runs else None

    deadline = time.time() + 600
    while (run := pretrain_run()) is None or not client.get_metric_history(run.info.run_id, "train/loss"):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "mixer.log").read_text()[-3000:]
        time.sleep(1)
    server.stop()
    down_at = time.time() * 1000
    time.sleep(35)  # past the sender's longest wait between retries (30 s)
    assert proc.poll() is None, (tmp_path / "mixer.log").read_text()[-3000:]  # still training, no crash
    server.start()
    up_at = time.time() * 1000
    time.sleep(10)
    proc.send_signal(signal.SIGTERM)  # preempted: saves, flushes what is pending, exits 75
    assert proc.wait(timeout=600) == 75, (tmp_path / "mixer.log").read_text()[-3000:]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, steps[-1] + 1)), "every logged step arrived once"
    during = [m for m in history if down_at < m.timestamp < up_at]
    assert len(during) >= 5, "steps were measured while the server was down"
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "KILLED" and "tracking/dropped_values" not in finished.data.tags
    assert finished.data.tags["preempted_at_step"] == str(steps[-1])
