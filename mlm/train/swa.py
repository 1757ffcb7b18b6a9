"""Stochastic weight averaging (--swa_start_step): a running mean of the weights, torch's AveragedModel.

From the start step on, the averaged copy takes in the weights after every optimizer step (an equal-weight
mean of those snapshots). Every rank keeps the same copy (the updates are deterministic), so the average can be
evaluated with the same exact, sharded evaluation as the model itself; best/ is the averaged model whenever its
perplexity is the better one. BERT has no batch-norm, so no statistics need recomputing after averaging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from mlm.model.modeling import MaskedLMLoss


class WeightAverage:
    """torch's AveragedModel as the container (its state_dict format: `module.*` and `n_averaged`), updated
    here without a host-device sync: AveragedModel.update_parameters asks `n_averaged == 0` and copies its
    CPU count to the GPU at every update. The count of snapshots is known on the host (one per step from the
    start step), so the running mean is one foreach lerp with a host weight."""

    def __init__(self, model: nn.Module, start_step: int):
        self.start_step = start_step
        self.averaged = AveragedModel(model, use_buffers=False)
        self.averaged.requires_grad_(False)
        self.loss_module = MaskedLMLoss(self.averaged.module)  # evaluation only (eval_nll: never smoothed)
        self.count = 0  # snapshots in the average

    @property
    def model(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step < self.start_step:
            return
        averaged = list(self.averaged.module.parameters())
        current = [p.detach() for p in model.parameters()]
        if self.count == 0:
            torch._foreach_copy_(averaged, current)
        else:  # mean of n+1 snapshots = mean of n + (new - mean of n) / (n + 1)
            torch._foreach_lerp_(averaged, current, 1.0 / (self.count + 1))
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        self.averaged.n_averaged.fill_(self.count)
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
        self.count = int(self.averaged.n_averaged)
