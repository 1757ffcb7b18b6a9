"""One writer per run directory (invariant 9, docs/DESIGN.md): `output_dir/run.lock` names the run that holds it.

Rank 0 takes the lock before it reads or changes anything in output_dir, and removes it when the run ends. The
file says who holds it: host, pid (and the process's start time, so a reused pid is not taken for the holder),
start time, command, and the torchrun job and attempt. A second launch decides from it:

- this torchrun job's own earlier attempt (same TORCHELASTIC_RUN_ID, a lower restart count): torchrun stopped
  that attempt before starting this one, so the lock is taken over at once;
- a holder on this host: alive while its pid runs with the recorded start time (and is not a zombie); a live
  one makes the launch refuse at once, a dead one's lock is taken over at once;
- a holder on another host (nodes sharing the directory): its pid cannot be checked from here, so the holder
  touches the file every HEARTBEAT_S seconds (the file's mtime, which a shared filesystem sets from one clock).
  A lock untouched for STALE_AFTER_S by this host's clock is taken over at once; otherwise the launch watches
  it for up to STALE_AFTER_S: a touch means the holder lives (refuse), none means it died (take over). So a
  run whose node vanished is taken over at most STALE_AFTER_S after the relaunch.

A takeover moves the stale file aside with a rename (atomic: of two launches taking over, one wins and the other
finds the new lock) before creating the new one with O_EXCL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from mlm.common.cli import UserError
from mlm.common.processes import pid_alive, process_start

log = logging.getLogger("mlm")
LOCK_FILE = "run.lock"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


@dataclass(frozen=True)
class Holder:
    """What run.lock says about the run holding the directory."""

    host: str
    pid: int
    pid_start: Optional[int]
    started: float
    command: str
    job: Optional[str]
    attempt: int
    token: str

    @staticmethod
    def me() -> Holder:
        proc = process_start(os.getpid())
        return Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=proc[1] if proc else None,
            started=time.time(),
            command=" ".join(sys.argv),
            job=os.environ.get("TORCHELASTIC_RUN_ID"),
            attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {when}: {self.command}"


TORN = "?"  # the token of a lock file that cannot be read: its writer died between creating and filling it


def _read(path: str) -> Optional[tuple[Holder, os.stat_result]]:
    """The holder and the file's stat; None when there is no lock."""
    for attempt in range(2):
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
            # Only the fields this version knows, so that another version's lock is still read as a holder.
            return Holder(**{f.name: d[f.name] for f in dataclasses.fields(Holder) if f.name in d}), st
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            if attempt == 0:
                time.sleep(0.2)  # perhaps read between its creation and its first write: look again
    return Holder(TORN, 0, None, 0.0, TORN, None, 0, TORN), st


def _create(path: str, me: Holder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me.__dict__, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.remove(path)  # a full disk: leave no empty lock behind
        raise
    return True


def _take_over(path: str, judged: os.stat_result) -> None:
    """Move the stale lock aside, unless another launch replaced it since it was judged (then leave theirs)."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another launch moved it first
    st = os.stat(aside)
    if (st.st_ino, st.st_dev) != (judged.st_ino, judged.st_dev):
        try:  # we moved a fresh lock of another launch: put it back where it was
            os.link(aside, path)
        except FileExistsError:
            pass
    os.remove(aside)


def _is_alive(holder: Holder, st: os.stat_result, me: Holder, path: str) -> bool:
    if holder.token == TORN:
        return False
    if holder.job is not None and holder.job == me.job and holder.attempt < me.attempt:
        return False  # this torchrun job's own earlier attempt, which torchrun stopped before restarting
    if holder.host == me.host:
        return pid_alive(holder.pid, holder.pid_start)
    if time.time() - st.st_mtime > STALE_AFTER_S:
        return False  # no heartbeat for longer than a live holder ever leaves it
    log.info(
        f"{path} names a run on host {holder.host} (pid {holder.pid}); watching its heartbeat for up to "
        f"{STALE_AFTER_S:.0f} s to tell whether it is alive"
    )
    deadline = time.monotonic() + STALE_AFTER_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False  # it ended (or another launch took it over): decide again
        if now.st_mtime != st.st_mtime or now.st_ino != st.st_ino:
            return True
    return False


class RunLock:
    """This run's hold on output_dir: a heartbeat thread touches the file; release() removes it."""

    def __init__(self, path: str, me: Holder):
        self.path, self.me = path, me
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlm-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)  # needs no free space: a full disk does not stop the heartbeat
            except OSError:
                pass  # gone (taken over): check() says so at the next save

    def check(self) -> None:
        """Before a write: the directory is still this run's (a run frozen past STALE_AFTER_S on a node that
        other nodes could not see may have been taken over)."""
        found = _read(self.path)
        if found is None or found[0].token != self.me.token:
            other = f" by {found[0].describe()}" if found else ""
            raise UserError(
                f"{self.path} was taken over{other} while this run was unresponsive; this run stops "
                "without writing, so the two never write the same directory"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        found = _read(self.path)
        if found is not None and found[0].token == self.me.token:
            os.remove(self.path)


def acquire(output_dir: str) -> RunLock:
    """Rank 0, before anything in output_dir is read or changed: hold it, or a UserError naming the live run."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    me = Holder.me()
    for _ in range(10):  # each pass either creates the lock or judges the one there
        if _create(path, me):
            return RunLock(path, me)
        found = _read(path)
        if found is None:
            continue
        holder, st = found
        if _is_alive(holder, st, me, path):
            raise UserError(
                f"--output_dir {output_dir!r} is in use by a live run ({holder.describe()}); wait for it "
                "to finish, or give this run another --output_dir"
            )
        log.warning(f"warning: taking over {path} from a run that is no longer alive ({holder.describe()})")
        _take_over(path, st)
    raise UserError(f"could not take {path}: other launches keep replacing it; launch one run per --output_dir")
