"""Whether a process recorded by pid is still the one running: for the run lock and the data cache's
unfinished preparations, which must not take over (or remove) the work of a live process."""

from __future__ import annotations

import os
from typing import Optional


def process_start(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """Whether pid is running (start: its recorded start time, so that a reused pid is another process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    proc = process_start(pid)
    if proc is None:
        return True
    state, started = proc
    return state != "Z" and (start is None or started == start)  # a zombie is dead; another start, another process
