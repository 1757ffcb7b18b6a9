"""Rank 0's writes to the run directory, agreed: a write that finds the disk full stops every rank at the same
step, and nothing saved before is damaged (invariant 9, docs/DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, TypeVar

from mlm.common.distributed import DistEnv, any_rank
from mlm.common.files import DiskFull, free_bytes, is_disk_full
from mlm.train.checkpoint import latest_complete_checkpoint

T = TypeVar("T")


def disk_full_message(output_dir: str, what: str, step: int) -> str:
    newest = latest_complete_checkpoint(output_dir)
    return (
        f"no space left on the disk of {output_dir} ({free_bytes(output_dir) / 2**30:.2f} GiB free) while "
        f"writing {what} at step {step}; the half-written copy was removed and nothing saved before was "
        f"changed; the newest intact checkpoint is {newest or 'none yet'}. Free space and run the same "
        "command to resume"
    )


def write_on_main(env: DistEnv, output_dir: str, step: int, what: str, fn: Callable[[], T]) -> Optional[T]:
    """fn on rank 0 (the rank that writes the run directory); every rank learns whether it found the disk full
    (one int over the CPU control group) and, if so, all leave at this step with DiskFull, rank 0's naming the
    directory, the free space and the newest intact checkpoint. Any other failure propagates as it is."""
    failure, result = "", None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:
            if not is_disk_full(e):
                raise
            failure = disk_full_message(output_dir, what, step)
    if any_rank(bool(failure), env):
        raise DiskFull(failure)  # empty on the other ranks: rank 0 says it once
    return result
