"""`python -m pipeline.launch`: a stop signal repeated while the workers save does not cut their shutdown short."""

import signal
import subprocess
import sys
import time

from tests.conftest import REPO

# A worker that, once told to stop, takes a while to save (as a rank writing its checkpoint does), then exits.
WORKER = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
(out / f"ready{os.environ['RANK']}").touch()
while not stop:
    time.sleep(0.05)
time.sleep(4)
(out / f"saved{os.environ['RANK']}").touch()
sys.exit(75)
"""


def test_repeated_sigterms_leave_the_workers_their_time_to_save(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "launcher.log"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline.launch", "--standalone", "--nproc-per-node", "2",
         str(tmp_path / "worker.py"), str(tmp_path)],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert launcher.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    # As under Slurm: the scheduler's own SIGTERM, then srun passing on the one it got and the batch script's.
    for _ in range(3):
        launcher.send_signal(signal.SIGTERM)
        time.sleep(1)
    launcher.wait(timeout=60)
    # A scheduler kills whatever the launcher leaves behind: the workers must have saved before it exited.
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists(), log.read_text()
    assert launcher.returncode != 0  # stopped, not finished
