"""The ranks of a gloo world as spawned interpreters that stay: train_ddp.main(argv) on each, run after run.

Most multi-process tests test what the ranks do together (DDP equivalence, exact evaluation, agreed stops, the
history and W&B written once), not how they were launched. Starting fresh interpreters for each such run cost
about 4 CPU-seconds of imports per rank (torch, transformers), most of the suite's time on a 2-core machine. A
pool starts its ranks once per pytest worker (multiprocessing's spawn: real interpreters, not forks) and hands
each run the variables torchrun gives a worker (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), its environment,
working directory and arguments; each rank then runs the same train_ddp.main that torchrun's workers run, and
creates and destroys its process group as they do; once a rank has failed, the others get SIGTERM, as torchrun's
agent sends them. What torchrun itself does (its agent, restarts, signals,
elastic membership, a failing rank's peers stopped) is tested under real torchrun (helpers.run_train with
torchrun_args or a fault, helpers.start_ranks).

A run that outlives its timeout is a hang: the pool's ranks are killed (the next run starts new ones) and the
test fails."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing import connection
from typing import Optional

# Read when a module is imported, so a run cannot change them in a rank that has already imported it: a run
# that sets one goes to torchrun instead.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "TOKENIZERS")


# Faults (tests/faulty_train.py) that only watch or slow a run: a rank of the pool installs them for one run and
# restores what they replaced. Faults that kill or raise, or fake CUDA, run under torchrun.
POOL_FAULTS = {"record", "sleep", "prep_sleep", "compile_backend"}


def pool_fault(fault: Optional[dict]) -> bool:
    return fault is None or set(fault) <= POOL_FAULTS


def _patched_places() -> list[tuple[object, str]]:
    """Everything faulty_train.install may replace."""
    import torch

    from mlm.data import cached
    from mlm.model import modeling
    from mlm.train import checkpoint, loop

    return [
        (loop, "prepare_batch"),
        (loop, "train_step"),
        (cached, "_build_cache"),
        (modeling.MaskedLMLoss, "forward"),
        (checkpoint.torch, "save"),
        (torch, "compile"),
    ]


def importable_env(extra_env: Optional[dict]) -> bool:
    return not any(k.startswith(IMPORT_TIME_PREFIXES) and os.environ.get(k) != v for k, v in (extra_env or {}).items())


def _read(fh) -> str:
    fh.seek(0)
    return fh.read().decode("utf-8", errors="replace")


def _serve(conn) -> None:
    """A rank: run train_ddp.main for each request, with fds 1 and 2 going to files sent back with the code."""
    import torch

    import train_ddp  # once: what the pool exists to pay only once

    # Between runs a SIGTERM (below, RankPool.run) finds nothing to stop; a run installs its own handlers.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    # A spawned child inherits the spawn start method; a rank torchrun starts has the platform's default (fork),
    # which its loader workers use.
    mp.set_start_method("fork", force=True)

    while True:
        try:
            request = conn.recv()
        except EOFError:  # the pytest worker is gone
            return
        if request is None:
            return
        argv, env, cwd, fault = request
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        # What OMP_NUM_THREADS gives a fresh interpreter (torch reads it once, at import): the same numbers as a
        # rank torchrun starts, and no more threads than the tests' cores hold.
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        saved_places = [(obj, name, obj.__dict__[name]) for obj, name in _patched_places()]
        try:
            if fault:
                import faulty_train

                faulty_train.install(fault)
            code = train_ddp.main(argv)
        except SystemExit as e:  # argparse's --help, say
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a bug: shown as torchrun would show it, the rank ends the run with 1
            traceback.print_exc()
            code = 1
        finally:
            for obj, name, value in saved_places:
                setattr(obj, name, value)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        conn.send((code, _read(out), _read(err)))


class RankPool:
    def __init__(self, nproc: int):
        ctx = mp.get_context("spawn")
        self.nproc, self.conns, self.procs = nproc, [], []
        for _ in range(nproc):
            parent, child = ctx.Pipe()
            # Not a daemon: a rank starts loader workers of its own (a daemonic process may not have children).
            proc = ctx.Process(target=_serve, args=(child,))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(
        self, argv: list[str], envs: list[dict], cwd: str, timeout: float, fault: Optional[dict] = None
    ) -> tuple[int, str, str]:
        """(0 when every rank returned 0, else 1, as torchrun exits; stdout and stderr of each rank in order).
        Once a rank returns non-zero, the ranks still running get SIGTERM, as torchrun's agent sends them."""
        for conn, env in zip(self.conns, envs):
            conn.send((argv, env, cwd, fault))
        deadline, results, failed = time.monotonic() + timeout, {}, False
        while len(results) < self.nproc:
            waiting = [c for c in self.conns if c not in results]
            ready = connection.wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close(kill=True)
                ranks = [self.conns.index(c) for c in waiting]
                raise AssertionError(f"rank(s) {ranks} still running after {timeout:.0f} s (a hang): {argv}")
            for conn in ready:
                results[conn] = conn.recv()
                failed = failed or results[conn][0] != 0
            if failed:
                for conn, proc in zip(self.conns, self.procs):
                    if conn not in results and proc.pid is not None:
                        os.kill(proc.pid, signal.SIGTERM)
        ordered = [results[c] for c in self.conns]
        code = 0 if all(c == 0 for c, _, _ in ordered) else 1
        return code, "".join(o for _, o, _ in ordered), "".join(e for _, _, e in ordered)

    def close(self, kill: bool = False) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if not kill and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()


_pools: dict[int, RankPool] = {}


@atexit.register
def close_all() -> None:
    for p in _pools.values():
        p.close()
    _pools.clear()


def pool(nproc: int) -> RankPool:
    """This pytest worker's pool of nproc ranks (started on first use, again after a hang)."""
    if nproc not in _pools or not _pools[nproc].alive():
        _pools[nproc] = RankPool(nproc)
    return _pools[nproc]
