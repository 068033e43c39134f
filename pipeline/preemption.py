"""Stop signals (preemption, time limits) turned into a save and an exit for the requeue, agreed by all ranks."""

from __future__ import annotations

import signal

from pipeline import dist

# Seconds a preempted stage waits for its pending MLflow calls before it exits for the requeue.
PREEMPTED_FLUSH_S = 15.0


class Preempted(Exception):
    """The scheduler asked the job to stop; a checkpoint of the current step is saved."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(f"stage {stage!r} preempted at step {step}; its checkpoint is saved")
        self.step = step


class Preemption:
    """SIGTERM (preemption, time limit) and SIGUSR1 (Slurm's --signal warning) ask every rank to finish the step it
    is in, save, and exit with REQUEUE_EXIT. Ranks may get the signal at different steps, so they agree on it
    through one all-reduce per step.

    `catch()` turns the signals into that request for the whole life of a rank, from before its set-up: one signalled
    while it builds its engine stops at its first step, and one that is failing is not killed halfway through its
    failure handling (torchrun sends SIGTERM to every other rank as soon as one fails)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    requested = False  # since `catch()`, in this process

    @classmethod
    def catch(cls) -> None:
        for sig in cls.SIGNALS:
            signal.signal(sig, cls._request)

    @classmethod
    def _request(cls, signum: int, frame: object) -> None:
        cls.requested = True

    def __init__(self) -> None:
        self.catch()  # already done where `mixer stage` started the rank; a rank started otherwise starts here

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(stop requested on any rank, a time-based save due on any rank), in one collective."""
        stop, due = dist.all_reduce_max([float(self.requested), float(save_due)])
        return stop > 0, due > 0
