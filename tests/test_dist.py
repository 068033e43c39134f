"""Process groups: processes started without a launcher, several at once on one machine, each get their own port."""

import os
import subprocess
import sys
import time

from tests.conftest import REPO

# Holds its one-rank group open until the test says `go`, so that both processes have theirs at the same time.
ONE_RANK = """
import os, sys, time
from pathlib import Path
from pipeline import dist
out = Path(sys.argv[1])
dist.init_process_group(dist.read_env("cpu"))
(out / f"port{sys.argv[2]}").write_text(os.environ["MASTER_PORT"])
while not (out / "go").exists():
    time.sleep(0.1)
"""


def test_two_processes_without_a_launcher_run_side_by_side(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_RANK, str(tmp_path), str(i)],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"port{i}").exists() for i in range(2)):
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            break
        time.sleep(0.1)
    (tmp_path / "go").touch()
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert (tmp_path / "port0").read_text() != (tmp_path / "port1").read_text()


ENTRY = """
import os
from pipeline import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("queues", os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
"""


def test_every_mixer_process_asks_cuda_for_32_work_queues_unless_told_otherwise():
    """Set at the entry point, before anything makes a CUDA context (which reads it); a user's value stays."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    runs = [
        subprocess.run([sys.executable, "-c", ENTRY], env=e, cwd=REPO, capture_output=True, text=True, check=True)
        for e in (env, {**env, "CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    ]
    assert [r.stdout.splitlines()[-1] for r in runs] == ["queues 32", "queues 8"]


THREADS = "import torch; from pipeline import dist; dist.share_cpu_threads(); print('threads', torch.get_num_threads())"


def test_a_rank_takes_its_share_of_the_cores_unless_omp_num_threads_says_otherwise():
    """Under the DeepSpeed launcher (LOCAL_SIZE) or srun, which set no OMP_NUM_THREADS, as under torchrun."""
    cores = os.cpu_count() or 1
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")}
    cases = [({"LOCAL_SIZE": "2"}, max(1, cores // 2)), ({"LOCAL_SIZE": str(4 * cores)}, 1), ({}, cores),
             ({"LOCAL_SIZE": str(4 * cores), "OMP_NUM_THREADS": str(cores)}, cores)]  # fmt: skip
    for extra, threads in cases:
        run = subprocess.run([sys.executable, "-c", THREADS], env={**base, **extra}, cwd=REPO, capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert run.stdout.split()[-1] == str(threads), (extra, run.stdout)
