"""Stopping on SIGTERM / SIGINT: every rank agrees to stop at the next step boundary, saves, and exits.

Kaggle, Colab, Slurm and spot instances announce the end with SIGTERM (Ctrl-C is SIGINT); torchrun forwards the
signal to its workers and kills them about 30 s later. A handler only records the signal: the training loop
asks every step whether any rank has one (`StopRequest.agreed`), so all ranks leave at the same step, write
one checkpoint and exit with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

If the agreed stop cannot be reached (a peer is dead and a collective hangs, a save takes too long), a
watchdog ends the process `grace_seconds` after the first signal, before torchrun's SIGKILL, so nothing hangs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("mlm")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Preempted(Exception):
    """Raised on every rank after the agreed stop's checkpoint is written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StoppedPreparing(Preempted):
    """Raised where a signal arrives while the data is prepared, before the first step: nothing to save yet, and
    the unfinished cache entry is removed on the way out."""


OUT_OF_TIME = 1000  # what agreed() returns when the --max_runtime budget is reached (no signal is numbered so)
EXIT_OUT_OF_TIME = 5


class OutOfTime(Exception):
    """Raised on every rank after the checkpoint of a run stopped by --max_runtime is written."""

    exit_code = EXIT_OUT_OF_TIME


class StopRequest:
    """Records the first stop signal of this process; agreed() turns it, or a time budget about to run out,
    into a decision of all ranks.

    The budget (--max_runtime) counts from `started`. A run must stop while there is time for one more step
    and a checkpoint: the loop tells expect() how long those take here (the slowest rank decides, as every rank
    asks with its own figures and the answer is the maximum)."""

    def __init__(
        self,
        grace_seconds: float,
        group: Optional[dist.ProcessGroup] = None,
        budget: Optional[float] = None,
        started: Optional[float] = None,
    ):
        self.grace_seconds = grace_seconds
        self.group = group  # a CPU (gloo) group: asking costs no device sync
        self.budget, self.started = budget, time.monotonic() if started is None else started
        self.step_seconds, self.save_seconds = 0.0, 0.0
        self.projected_end = 0.0  # the estimate the last budget check decided on (seconds from `started`)
        self.signum = 0
        self._previous = {}
        self._watchdog: Optional[threading.Timer] = None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def raise_if_signalled(self) -> None:
        """For work before the first step (preparing the data): stop now, on this rank, when a signal came; the
        ranks waiting for it learn of the stop from its failure."""
        if self.signum:
            raise StoppedPreparing(self.signum)

    def _handle(self, signum: int, frame) -> None:
        # Only the first signal counts: Ctrl-C reaches a worker twice (from the terminal and from torchrun).
        if self.signum:
            return
        self.signum = signum
        self._watchdog = threading.Timer(self.grace_seconds, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        os.write(
            2,
            f"rank {os.environ.get('RANK', '0')}: could not stop cleanly within {self.grace_seconds:g} s "
            f"of {signal_name(self.signum)}; exiting without a new checkpoint\n".encode(),
        )
        os._exit(128 + self.signum)

    def expect(self, step_seconds: float, save_seconds: float) -> None:
        """What the next step and a checkpoint take here (the loop measures them)."""
        self.step_seconds, self.save_seconds = step_seconds, save_seconds

    def _projected_end(self) -> float:
        """When one more step and a checkpoint, with a 10% margin, would end (seconds from `started`)."""
        return time.monotonic() - self.started + 1.1 * (self.step_seconds + self.save_seconds)

    def out_of_time(self) -> bool:
        """Whether one more step and a checkpoint would overrun the budget."""
        return self.budget is not None and self._projected_end() >= self.budget

    def agreed(self) -> int:
        """The signal number when any rank has received one, else OUT_OF_TIME when any rank finds the budget
        about to run out, else 0; the same on every rank. Collective. projected_end is then the latest
        estimate of any rank, the one the decision rests on."""
        end = self._projected_end() if self.budget is not None else 0.0
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([float(self.signum), end], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            signum, end = int(t[0].item()), float(t[1].item())
        else:
            signum = self.signum
        self.projected_end = end
        late = OUT_OF_TIME if self.budget is not None and end >= self.budget else 0
        return signum or late
