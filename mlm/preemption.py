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


class StopRequest:
    """Records the first stop signal of this process; agreed() turns it into a decision of all ranks."""

    def __init__(self, grace_seconds: float, group: Optional[dist.ProcessGroup] = None):
        self.grace_seconds = grace_seconds
        self.group = group  # a CPU (gloo) group: asking costs no device sync
        self.signum = 0
        self._previous = {}
        self._watchdog: Optional[threading.Timer] = None

    def install(self) -> "StopRequest":
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

    def _handle(self, signum: int, frame) -> None:
        # Only the first signal counts: Ctrl-C reaches a worker twice (from the terminal and from torchrun).
        if self.signum:
            return
        self.signum = signum
        self._watchdog = threading.Timer(self.grace_seconds, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        os.write(2, f"rank {os.environ.get('RANK', '0')}: could not stop cleanly within {self.grace_seconds:g} s "
                    f"of {signal_name(self.signum)}; exiting without a new checkpoint\n".encode())
        os._exit(128 + self.signum)

    def agreed(self) -> int:
        """The signal number when any rank has received one (the same on every rank), else 0. Collective."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        t = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())
