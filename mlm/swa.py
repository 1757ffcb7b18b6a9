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

from .modeling import MaskedLMLoss


class WeightAverage:
    def __init__(self, model: nn.Module, start_step: int):
        self.start_step = start_step
        self.averaged = AveragedModel(model, use_buffers=False)
        self.averaged.requires_grad_(False)
        self.loss_module = MaskedLMLoss(self.averaged.module)  # evaluation only (eval_nll: never smoothed)

    @property
    def count(self) -> int:
        """How many snapshots the average holds."""
        return int(self.averaged.n_averaged.item())

    @property
    def model(self) -> nn.Module:
        return self.averaged.module

    def update(self, model: nn.Module, step: int) -> None:
        if step >= self.start_step:
            self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
