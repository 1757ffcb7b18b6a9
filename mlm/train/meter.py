"""The running sums between two logs: what a log line, the history and W&B report about the steps since the last
one (the exact global mean loss, the largest rank mean, tokens/s, MFU, peak memory, skipped steps)."""

from __future__ import annotations

import time

import torch

from mlm.common.distributed import dist_max, dist_sum, dist_world
from mlm.report.metrics import Throughput, mlm_step_flops, peak_memory_bytes
from mlm.train.engine import StepResult


class StepMeter:
    """Running sums of the steps since the last log: device values stay on the device (no sync until logging),
    counts the host knows stay on the host."""

    def __init__(self, device: torch.device, throughput: Throughput):
        self.device, self.shape, self.peak_flops = device, throughput.shape, throughput.peak_flops
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)  # kept across logs
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # NLL, skipped steps
        self.counts = [0, 0, 0, 0]  # masked tokens, tokens, sequences, sum of squared lengths
        self.grad_norm = torch.zeros((), device=self.device)
        self.t0 = time.perf_counter()
        self.excluded = 0.0  # seconds spent evaluating or saving: not training throughput

    def exclude_since(self, t: float) -> None:
        self.excluded += time.perf_counter() - t

    def add(self, r: StepResult) -> None:
        self.sums += torch.stack([r.loss_sum.double(), r.skipped.double()])
        step_counts = (r.masked_tokens, r.tokens, r.sequences, r.sum_sq_lengths)
        self.counts = [a + b for a, b in zip(self.counts, step_counts)]
        self.grad_norm = r.grad_norm
        self.consecutive = (self.consecutive + 1) * r.skipped  # consecutive skipped steps, 0 after a good one

    def collect(self) -> dict[str, float]:
        """Collective: every rank calls it at the same step. train/loss is the exact global mean: the NLL
        summed over every rank's masked tokens divided by their total count (ranks weigh by their tokens)."""
        masked_here = torch.tensor(float(max(self.counts[0], 1)), dtype=torch.float64).to(self.device)
        local_mean = self.sums[0] / masked_here
        memory = torch.tensor([float(m) for m in peak_memory_bytes(self.device)], dtype=torch.float64)
        maxima = dist_max(torch.cat([torch.stack([local_mean, self.consecutive.double()]), memory.to(self.device)]))
        loss_max, consecutive, memory, reserved = maxima.tolist()
        totals = torch.cat([self.sums, torch.tensor(self.counts, dtype=torch.float64).to(self.device)])
        nll, skipped, masked, tokens, sequences, sum_sq = dist_sum(totals).tolist()
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        flops = mlm_step_flops(self.shape, tokens, sum_sq, masked)
        # skipped_steps is summed over ranks, and every rank skips the same steps: divide it back.
        return {
            "loss": nll / max(masked, 1),
            "loss_max": loss_max,
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": sequences / seconds,
            "mfu": flops / seconds / self.peak_flops,
            "peak_memory_gib": memory / 2**30,
            "peak_memory_reserved_gib": reserved / 2**30,
            "skipped_steps": round(skipped / dist_world()),
            "consecutive_skipped": int(consecutive),
        }
