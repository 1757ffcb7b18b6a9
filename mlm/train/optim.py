"""Optimisation: parameter groups (no weight decay on biases and LayerNorm, layer-wise LR decay), fused AdamW,
its sync-free skip of a non-finite step, and the learning-rate schedule kept on the device."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from mlm.config import TrainConfig, schedule_defaults, scheduler_kwargs

_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, num_layers + 1 for the head and anything else."""
    if "embeddings." in name:
        return 0
    m = _LAYER.search(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def count_layers(model: nn.Module) -> int:
    found = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))]
    return max(found) + 1 if found else 0


def param_groups(
    model: nn.Module, weight_decay: float, learning_rate: float, layerwise_lr_decay: Optional[float] = None
) -> list[dict]:
    """Weight decay on weight matrices and embeddings only, never on biases nor LayerNorm weights; with
    layer-wise decay, one group per (depth, decay) at learning_rate * factor ** (top depth - depth)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    layers = count_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():  # each parameter once: a tied decoder is the word embeddings
        if not p.requires_grad:
            continue
        decay = not (id(p) in no_decay or name.endswith("bias"))
        depth = layer_depth(name, layers) if layerwise_lr_decay else 0
        lr = learning_rate * layerwise_lr_decay ** (layers + 1 - depth) if layerwise_lr_decay else learning_rate
        group = groups.setdefault(
            (depth, decay), {"params": [], "names": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0}
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """optimizer.step(), skipped when the gradients are not finite (bf16/fp32, where no GradScaler checks).

    A fused optimizer takes the flag as a device tensor and skips inside its kernel, as under GradScaler, so
    there is no host sync; any other optimizer needs the flag on the host. `found_inf` is the attribute
    GradScaler itself sets for fused optimizers (torch's protocol, not a public API):
    tests/test_resilience.py::test_a_step_with_nonfinite_gradients_changes_nothing fails if torch drops it."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.float()  # 0-dim, like the step counters it is subtracted from
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(nonfinite):
        optimizer.step()


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type in ("cuda", "cpu")  # one fused kernel per step (CPU: torch >= 2.4)
    groups = param_groups(model, cfg.weight_decay, cfg.learning_rate, cfg.layerwise_lr_decay)
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
        foreach=None if fused else True,
    )


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.num_warmup_steps is not None:
        return cfg.num_warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


class AppliedStepSchedule:
    """The learning-rate schedule, indexed by the optimizer steps actually applied, kept on the device.

    A step skipped for non-finite gradients (GradScaler's overflow in fp16, the fused skip in bf16/fp32) does
    not advance the schedule, as in the Hugging Face Trainer: early fp16 overflows do not eat the warmup. The
    host never asks whether a step was skipped (that would sync every step): each group's lr is a device
    tensor the fused AdamW kernel reads, refreshed after every step from a table of the library's schedule at
    the applied-step count, which lives on the device too.

    The schedule is defined in steps of the global batch the run started with (`schedule_steps` of
    `schedule_batch` examples). A run resumed with another global batch continues it by examples seen: its
    applied step a sits at position p0 + (a - a0) * batch / schedule_batch of the original schedule, where
    (a0, p0) are the applied count and position at the resume."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        make_lambda: Callable[[int], Callable[[float], float]],
        total_steps: int,
        batch: int = 1,
    ):
        device = optimizer.param_groups[0]["params"][0].device
        self.optimizer, self.make_lambda, self.total_steps, self.batch = optimizer, make_lambda, total_steps, batch
        self.schedule_steps, self.schedule_batch, self.start = total_steps, batch, (0, 0.0)
        self.base = torch.tensor(
            [float(g.setdefault("initial_lr", g["lr"])) for g in optimizer.param_groups],
            dtype=torch.float64,
            device=device,
        )
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.lrs = torch.empty(len(optimizer.param_groups), dtype=torch.float32, device=device)
        self._build()

    def _position(self, applied: int) -> float:
        a0, p0 = self.start
        return p0 + (applied - a0) * self.batch / self.schedule_batch

    def _build(self) -> None:
        lr_lambda = self.make_lambda(self.schedule_steps)
        a0 = self.start[0]
        self.table = torch.tensor(
            [lr_lambda(s) if s < a0 else lr_lambda(self._position(s)) for s in range(self.total_steps + 1)],
            dtype=torch.float64,
            device=self.base.device,
        )
        self._attach()

    def _attach(self) -> None:
        """Point every group's lr at its slot of self.lrs (again after optimizer.load_state_dict)."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lrs[i]
        self._refresh()

    def _refresh(self) -> None:
        # index_select with a device index: python indexing would turn a 0-dim index into a host int (a sync).
        index = self.applied.clamp(max=self.table.numel() - 1).view(1)
        self.lrs.copy_(self.base * self.table.index_select(0, index))

    def step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """After an optimizer step; skipped is the device flag (0/1) of a step that changed nothing."""
        self.applied += 1 if skipped is None else 1 - skipped
        self._refresh()

    def get_last_lr(self) -> list[float]:
        return self.lrs.tolist()  # a sync: logging only

    def state_dict(self) -> dict:
        applied = int(self.applied)  # a sync: at a checkpoint only
        return {
            "applied": applied,
            "position": self._position(applied),
            "schedule_steps": self.schedule_steps,
            "schedule_batch": self.schedule_batch,
        }

    def load_state_dict(self, d: dict) -> None:
        # "last_epoch" is what a checkpoint written with torch's LambdaLR (before this class) holds.
        applied = int(d["applied"] if "applied" in d else d["last_epoch"])
        self.applied.fill_(applied)
        if d.get("schedule_batch", self.batch) != self.batch or d.get("position", applied) != applied:
            self.schedule_steps, self.schedule_batch = d["schedule_steps"], d["schedule_batch"]
            self.start = (applied, float(d["position"]))
            self._build()
        else:
            self._attach()


def steps_left_at(schedule: dict, batch: int) -> int:
    """Optimizer steps of `batch` examples that finish a schedule saved as `schedule` (state_dict above)."""
    left = (schedule["schedule_steps"] - schedule["position"]) * schedule["schedule_batch"]
    return max(0, math.ceil(left / batch - 1e-9))


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, batch: int = 1
) -> AppliedStepSchedule:
    """transformers' schedule (its lr_lambda) behind an AppliedStepSchedule; batch: the global batch."""
    from transformers import get_scheduler

    def make_lambda(steps: int) -> Callable[[float], float]:
        # transformers' schedules are LambdaLR factories: one built on a stand-in optimizer gives the function
        # (LambdaLR.lr_lambdas) without touching the real optimizer's learning rates.
        # Its lr is the run's: polynomial's lr_end is an absolute rate, read against the optimizer's initial lr.
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
        lambda_lr = get_scheduler(
            cfg.lr_scheduler_type,
            stand_in,
            num_warmup_steps=warmup_steps(cfg, steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=schedule_defaults(cfg.lr_scheduler_type, scheduler_kwargs(cfg), steps),
        )
        return lambda_lr.lr_lambdas[0]

    return AppliedStepSchedule(optimizer, make_lambda, total_steps, batch)
