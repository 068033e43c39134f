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
    through one all-reduce per step, which runs in the background until the next step (`agreed`).

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
        self.pending: dist.Reducing | None = None

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(stop requested on any rank, a time-based save due on any rank). After the first call, the answer is the
        previous call's: each call's flags are reduced in the background until the next one, so that no rank waits
        at every step for the slowest to reach the same point (it has one step of slack). Every rank gets the same
        answer at the same step. On a stop nothing is left in flight."""
        flags = [float(self.requested), float(save_due)]
        previous = self.pending.result() if self.pending else dist.all_reduce_max(flags)  # the first step: now
        self.pending = dist.all_reduce_max_started(flags)
        stop, due = previous
        if stop > 0:
            self.settle()
        return stop > 0, due > 0

    def settle(self) -> None:
        """Wait for the reduction in flight: before the ranks go on to other collectives, as they all started it."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
