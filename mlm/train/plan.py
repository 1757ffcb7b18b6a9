"""What a run trains: how a step's examples are laid out and how many steps there are.

The config says what the user asked for and is never changed after parsing. A resume may keep the checkpoint's
global batch by deriving another accumulation, and finish the schedule's examples in another number of steps:
those derived values live here (train_ddp.plan_run builds the plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BatchLayout:
    """Examples per optimizer step: per device x processes x accumulation."""

    per_device: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world_size * self.accumulation

    def describe(self) -> str:
        """ "64 = 32 per device x 2 processes x 1 accumulation", as the banner and the model card say it."""
        return (
            f"{self.global_batch} = {self.per_device} per device x {self.world_size} processes x "
            f"{self.accumulation} accumulation"
        )


@dataclass(frozen=True)
class RunPlan:
    """The layout this run trains with, its step budget (--max_train_steps, or on a resume at another global
    batch the steps that finish the schedule's examples), and what a resume changed, for the banner."""

    layout: BatchLayout
    max_train_steps: Optional[int]
    changes: tuple[str, ...] = ()
