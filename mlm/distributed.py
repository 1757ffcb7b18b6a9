"""Process-group setup and the only calls to torch.distributed collectives in the project.

DDP is detected from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE), not from a flag: a plain
`python train_ddp.py` is a world of one and every helper here degrades to a no-op.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
log = logging.getLogger("mlm")


class PeerFailed(Exception):
    """Another rank failed in a step this rank waits on; that rank reports the error."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """Global rank from torchrun's environment, usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(timeout_seconds: float = 1800.0) -> DistEnv:
    rank, world = env_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        global _store
        rendezvous = dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout)
        store, _, _ = next(rendezvous)
        rendezvous.close()
        _store = store  # released in teardown(), after the group, not at interpreter exit
        # torchrun restarts a failed group against the same store: without a prefix per attempt, a worker can
        # read the previous attempt's (dead) peer addresses and fail or hang while connecting.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"mlm-ddp/attempt-{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


_control_group = None
_store = None


def control_group():
    """A CPU (gloo) group for small control messages (stop flags): asking costs no GPU sync. Collective the
    first time on GPU runs, where it is created next to the NCCL group; on CPU runs it is the default group."""
    global _control_group
    if not dist.is_initialized():
        return None
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


def is_peer_failure(exc: BaseException) -> bool:
    """An error of a collective: another rank died or left, and that rank (or torchrun) reports why."""
    return isinstance(exc, (PeerFailed, dist.DistError)) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("Connection closed by peer", "Connection reset",
                                                                      "Broken pipe", "[gloo", "NCCL")))


def teardown() -> None:
    global _control_group, _store
    _control_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _store = None
    gc.collect()  # the store's client threads stop here, not during interpreter shutdown


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


def dist_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, made once and given to every rank, so all leave a loop at the same step."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return bool(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on some rank."""
    return bool(dist_max(torch.tensor([int(flag)], device=device)).item())


def all_ranks(flag: bool) -> bool:
    """True on every rank when it is true on every rank; over the CPU control group, so no GPU sync."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return not bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_process_first(env: DistEnv, fn: Callable[[], T], per_node: bool = False) -> T:
    """Run fn on a leader first (it downloads or builds caches), then on the others, which read the result.

    The leader is global rank 0, or with per_node each node's local rank 0 (nodes that do not share a disk each
    need their own copy). A failure on a leader reaches every rank, so none waits at a barrier forever.
    """
    if not env.distributed:
        return fn()
    leader = env.local_rank == 0 if per_node else env.is_main
    if leader:
        try:
            result = fn()
        except BaseException:
            any_rank(True, env.device)
            raise
    if any_rank(False, env.device):
        raise PeerFailed("a process preparing shared files failed")
    return result if leader else fn()


def main_only(env: DistEnv, fn: Callable[[], None]) -> None:
    """Run a check on rank 0 alone; when it fails there, the other ranks stop too instead of waiting."""
    if not env.distributed:
        return fn()
    if env.is_main:
        try:
            fn()
        except BaseException:
            broadcast_flag(False, env.device)
            raise
        broadcast_flag(True, env.device)
    elif not broadcast_flag(False, env.device):
        raise PeerFailed("rank 0 failed a check")


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
