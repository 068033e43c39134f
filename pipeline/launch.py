"""`python -m pipeline.launch`: torchrun (same arguments), except that only the first stop signal counts.

torchrun answers SIGTERM by passing it to its workers and waiting for them (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s by
default) before it kills them. Its handler stays in place during that wait: a second signal breaks the wait off
(torchrun starts it over), a third ends torchrun at once, and a scheduler then kills the workers it leaves behind,
halfway through their checkpoint. Slurm sends that many when it preempts or requeues a job: to every process of the
job step, torchrun included, and through srun, which passes on the SIGTERM it got and the batch script's. Here
signals after the first are ignored, so the workers get the whole shutdown time to save.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType

from torch.distributed import run
from torch.distributed.elastic.multiprocessing import api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

PARENT_PID = "MIXER_PARENT_PID"  # set by `mixer run` for its stage launchers: the process they must not outlive
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_torchrun_handler = api._terminate_process_handler
_received: list[int] = []


def _first_signal_only(signum: int, frame: FrameType | None) -> None:
    if _received:
        return  # already shutting the workers down
    _received.append(signum)
    _torchrun_handler(signum, frame)


def die_with_parent(expected_parent: int | None = None) -> None:
    """SIGTERM to this process when its parent exits, however the parent ends (Linux's PR_SET_PDEATHSIG; nothing
    elsewhere): a launcher whose `mixer run` was killed stops its ranks, and a rank whose launcher was killed saves
    and stops, instead of training on unwatched beside the rerun. If the parent is already gone (not
    `expected_parent`, or adopted by init), the signal is raised at once."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    parent = os.getppid()
    if parent == 1 or (expected_parent is not None and parent != expected_parent):
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    expected = os.environ.pop(PARENT_PID, None)  # not passed on to the ranks, whose parent is this process
    # torchrun installs `api._terminate_process_handler` when it starts its workers; it looks the name up then.
    api._terminate_process_handler = _first_signal_only
    die_with_parent(int(expected) if expected else None)
    # Each failed rank says what failed in one line (`mixer stage`); torchrun's report of which ranks exited and
    # how (thirty lines and a traceback of its own) would bury it, so a failure is only an exit status here.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run.main()
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        sys.exit(next((code for code in codes if code > 0), 1))


if __name__ == "__main__":
    main()
