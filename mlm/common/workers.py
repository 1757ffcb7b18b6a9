"""How a torchrun worker ends on a user error: said once (by rank 0), and noted for launch.sh so that torchrun's
restarts do not retry it.

The standard library only: mlm.config.answer_user_errors_first uses it before torch is imported.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from mlm.common.cli import EXIT_USER_ERROR, LocalUserError, UserError, report

USER_ERROR_GRACE_S = 3.0  # how long a quiet rank leaves rank 0 to print the line, at most
USER_ERROR_FILE = "MLM_USER_ERROR_FILE"  # set by launch.sh: where a user error is noted for torchrun's restarts


def env_rank() -> int:
    """Global rank from torchrun's environment, usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (--max-restarts); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class _Stopped(Exception):
    pass


def _stopped(signum: int, frame) -> None:
    raise _Stopped


def wait_for_rank_0_to_report(seconds: float) -> None:
    """Sleep up to `seconds`, ended early by SIGTERM: torchrun sends it once another worker has exited, so rank
    0 has printed its line and the command can end now rather than at the end of the grace."""
    if threading.current_thread() is not threading.main_thread():
        time.sleep(seconds)  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        time.sleep(seconds)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def note_user_error(e: UserError) -> None:
    """Tell launch.sh (and torchrun's restarted attempts, which read it) that this run stopped on a user error:
    retrying cannot fix a typo or a bad data file."""
    path = os.environ.get(USER_ERROR_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{e}\n")


def stopped_on_a_user_error() -> bool:
    """A restarted attempt after a user error: it would fail the same way and say so again."""
    path = os.environ.get(USER_ERROR_FILE)
    return restart_count() > 0 and bool(path) and os.path.isfile(path) and os.path.getsize(path) > 0


def report_user_error(e: UserError, rank: int) -> int:
    """Every rank sees the same error; one line from rank 0 is enough, unless only this rank saw it."""
    if rank == 0 or isinstance(e, LocalUserError):
        note_user_error(e)
        return report(e)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun stops the other workers as soon as one exits: leave rank 0 time to print the error.
        wait_for_rank_0_to_report(USER_ERROR_GRACE_S)
    return EXIT_USER_ERROR
