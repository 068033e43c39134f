"""`python -m pipeline.launch`: torchrun (same arguments), except that only the first stop signal counts.

torchrun answers SIGTERM by passing it to its workers and waiting for them (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s by
default) before it kills them. Its handler stays in place during that wait: a second signal breaks the wait off
(torchrun starts it over), a third ends torchrun at once, and a scheduler then kills the workers it leaves behind,
halfway through their checkpoint. Slurm sends that many when it preempts or requeues a job: to every process of the
job step, torchrun included, and through srun, which passes on the SIGTERM it got and the batch script's. Here
signals after the first are ignored, so the workers get the whole shutdown time to save.
"""

from __future__ import annotations

from types import FrameType

from torch.distributed import run
from torch.distributed.elastic.multiprocessing import api

_torchrun_handler = api._terminate_process_handler
_received: list[int] = []


def _first_signal_only(signum: int, frame: FrameType | None) -> None:
    if _received:
        return  # already shutting the workers down
    _received.append(signum)
    _torchrun_handler(signum, frame)


def main() -> None:
    # torchrun installs `api._terminate_process_handler` when it starts its workers; it looks the name up then.
    api._terminate_process_handler = _first_signal_only
    run.main()


if __name__ == "__main__":
    main()
