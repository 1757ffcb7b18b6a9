"""Process-group setup and the only calls to torch.distributed collectives in the project.

DDP is detected from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE), not from a flag: a plain
`python train_ddp.py` is a world of one and every helper here degrades to a no-op.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, TypeVar

import torch
import torch.distributed as dist

from mlm.common import messages
from mlm.common.cli import LocalUserError, UserError
from mlm.common.workers import env_rank

T = TypeVar("T")
log = logging.getLogger("mlm")


class WaitedTooLong(LocalUserError):
    """This rank waited past --ddp_timeout for another: reported by the rank that waited (not only rank 0)."""


class PeerFailed(Exception):
    """Another rank failed in a step this rank waits on; that rank reports the error."""


@dataclass
class DistEnv:
    """This process's place in the job, and the distributed state it owns (no module globals): the rendezvous
    store and the control group live as long as the run holds this object; close() releases them."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # A CPU (gloo) group for control messages (stop flags, waiting for a leader): on GPU runs asking it costs
    # no device sync and a waiting rank sleeps in a socket read instead of spinning in an NCCL wait. The
    # default group on CPU runs; None in a world of one.
    control: Optional[dist.ProcessGroup] = None
    store: Optional[dist.Store] = field(default=None, repr=False)
    timeout_seconds: float = 1800.0  # --ddp_timeout
    waits: int = 0  # leader-first waits so far: each has its own keys in the store

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_gpu_count(local_rank: int) -> None:
    """More processes on this node than visible GPUs is a user error, found before any work (each process
    would otherwise fail in torch.cuda.set_device, or two would share a GPU)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    gpus = torch.cuda.device_count()
    if processes > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f" (CUDA_VISIBLE_DEVICES={visible!r} hides the others)" if visible is not None else ""
        raise UserError(
            f"{processes} processes on this node but {gpus} visible GPU(s){hidden}; start one process "
            f"per GPU: torchrun --nproc_per_node={gpus} (bash launch.sh counts them for you), or make "
            "more GPUs visible with CUDA_VISIBLE_DEVICES"
        )


def init_distributed(timeout_seconds: float = 1800.0) -> DistEnv:
    rank, world = env_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        check_gpu_count(local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    control = store = None
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        rendezvous = dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout)
        store, _, _ = next(rendezvous)  # released by close(), after the group, not at interpreter exit
        rendezvous.close()
        # torchrun restarts a failed group against the same store: without a prefix per attempt, a worker can
        # read the previous attempt's (dead) peer addresses and fail or hang while connecting.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"mlm-ddp/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
        control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        device=device,
        control=control,
        store=store,
        timeout_seconds=timeout_seconds,
    )


# What a rank sees when a peer process died or its host vanished: the connection to it is gone. Only these
# make a rank end quietly (the failed rank, or torchrun, reports why); any other error, an NCCL setup failure
# that hits every rank included, is reported by the rank that saw it.
def is_peer_failure(exc: BaseException) -> bool:
    """Another rank died or left, and that rank (or torchrun) reports why."""
    if isinstance(exc, PeerFailed):
        return True
    return isinstance(exc, (RuntimeError, dist.DistError)) and messages.names(str(exc), messages.LOST_PEER)


def describe_failure(exc: BaseException, rank: int) -> Optional[str]:
    """One line for a failure of the communication backend itself (NCCL, gloo), with what usually fixes it;
    None for any other error, which keeps its traceback."""
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or messages.names(text, messages.BACKEND)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"rank {rank}: the communication backend failed: {first[:300]}; {messages.backend_hint(text)}"


def teardown(env: Optional[DistEnv] = None) -> None:
    """Destroy the process group, then release the store: its client threads stop here, not during interpreter
    shutdown (which aborted a 2-rank run at exit 1 time in 8)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if env is not None:
        env.control = env.store = None
    gc.collect()


def dist_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (no host sync)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def dist_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def dist_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, made once and given to every rank, so all leave a loop at the same step."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return bool(t.item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on some rank; over the CPU control group (no device sync)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
    return bool(t.item())


def all_ranks(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on every rank; over the CPU control group (no device sync)."""
    return not any_rank(not flag, env)


HEARTBEAT_SECONDS = 5.0  # how often a leader at work says so through the store
SILENCE_SECONDS = 120.0  # no heartbeat for this long (or --ddp_timeout, if shorter): the leader is stuck or gone


def _patient_wait(env: DistEnv, leader: bool, fn: Callable[[], T], silence_limit: float) -> T | None:
    """fn on the leader(s); the others wait through the rendezvous store for as long as every leader is at work,
    however long that is (a multi-hour tokenisation, a slow download): each leader's heartbeat thread counts up a
    key while fn runs. A waiter gives up only when no heartbeat came for silence_limit seconds (a leader stuck
    or gone), with WaitedTooLong. Without a store (a group set up elsewhere) the collective's timeout applies."""
    result = None
    env.waits += 1
    key = f"mlm-ddp/leader-first/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{env.waits}"
    leaders = torch.tensor([int(leader)])
    dist.all_reduce(leaders, group=env.control)
    if leader:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                env.store.add(f"{key}/beat", 1)

        beater = threading.Thread(target=beat, name="mlm-leader-heartbeat", daemon=True)
        beater.start()
        try:
            result = fn()
        except BaseException:
            stop.set()
            env.store.add(f"{key}/done", 1)
            any_rank(True, env)
            raise
        finally:
            stop.set()
            beater.join()
        env.store.add(f"{key}/done", 1)
    else:
        # Polled from 1 ms up to 0.1 s: most waits (a config, a cache hit) end in milliseconds, and a store wait
        # with a timeout would print a C++ warning each time it ran out.
        last, heard, pause = -1, time.monotonic(), 0.001
        while env.store.add(f"{key}/done", 0) < int(leaders.item()):
            beats = env.store.add(f"{key}/beat", 0)
            if beats != last:
                last, heard = beats, time.monotonic()
            elif time.monotonic() - heard > silence_limit:
                raise WaitedTooLong(
                    f"rank {env.rank} heard nothing for {silence_limit:.0f} s from the process "
                    "preparing shared files (downloads, the tokenised cache); it is stuck or gone"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.1)
    return result


def _leader_first(env: DistEnv, leader: bool, fn: Callable[[], T]) -> T | None:
    """fn on the leader(s) while the others wait (sleeping in a store poll or a socket read, not spinning in an
    NCCL wait, so the leader keeps every core); a failure there reaches every rank, so none waits forever. With
    the rendezvous store, the others wait as long as a leader is at work (_patient_wait); without it, a leader
    still busy after --ddp_timeout is an error on the waiting ranks."""
    result = None
    if env.store is not None:
        result = _patient_wait(env, leader, fn, min(env.timeout_seconds, SILENCE_SECONDS))
    elif leader:
        try:
            result = fn()
        except BaseException:
            any_rank(True, env)
            raise
    try:
        failed = any_rank(False, env)
    except RuntimeError as e:
        if is_peer_failure(e) or not messages.names(str(e), messages.TIMED_OUT):
            raise
        raise WaitedTooLong(
            f"rank {env.rank} waited longer than --ddp_timeout for the process preparing shared "
            "files (downloads, the tokenised cache, the checkpoint's hash); raise --ddp_timeout"
        ) from None
    if failed:
        raise PeerFailed("a process preparing shared files failed")
    return result


def leads(env: DistEnv, per_node: bool = False) -> bool:
    """Whether this rank is main_process_first's leader: global rank 0, or with per_node each node's local rank 0
    (nodes that do not share a disk each need their own copy)."""
    return env.local_rank == 0 if per_node else env.is_main


def main_process_first(env: DistEnv, fn: Callable[[], T], per_node: bool = False) -> T:
    """Run fn on a leader first (it downloads or builds caches), then on the others, which read the result."""
    if not env.distributed:
        return fn()
    leader = leads(env, per_node)
    result = _leader_first(env, leader, fn)
    return result if leader else fn()


def main_only(env: DistEnv, fn: Callable[[], None]) -> None:
    """Run a check on rank 0 alone; when it fails there, the other ranks stop too instead of waiting."""
    if not env.distributed:
        return fn()
    _leader_first(env, env.is_main, fn)


def main_decides(env: DistEnv, fn: Callable[[], T]) -> T | None:
    """fn on rank 0 alone, its outcome given to every rank over the control group: a UserError there is raised
    on every rank (rank 0 says it; the others exit with the same code quietly), any other failure ends the
    others as PeerFailed. Returns fn's result on rank 0, None elsewhere."""
    if not env.distributed:
        return fn()
    outcome, result, failure = None, None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            outcome, failure = ("user", str(e)), e
        except BaseException as e:
            outcome, failure = ("failed", ""), e
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=env.control)
    if failure is not None:
        raise failure
    if box[0] is not None:
        kind, message = box[0]
        raise UserError(message) if kind == "user" else PeerFailed("rank 0 failed; it reports the error")
    return result


def broadcast_weights(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's parameters and buffers on every rank, in place (the default group: on the device)."""
    if env.distributed:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def gather_to_main(obj: T, env: DistEnv) -> list[T] | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's obj on every rank (a decision taken once, e.g. which checkpoint to resume)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP with gradients as views into its all-reduce buckets (one copy fewer per step, measured in
    bench/scaling.py) and no buffer broadcast before every forward: BERT's buffers (position and token-type
    ids) are constants. torch 2.13 renamed that option; older releases know only the old name."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    return DDP(
        module,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{no_sync: False},
    )
