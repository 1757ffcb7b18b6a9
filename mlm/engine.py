"""One optimizer step (accumulation, no_sync, autocast, GradScaler, clipping) and the exact evaluation pass."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .distributed import DistEnv, dist_sum
from .masking import EVAL_EPOCH, IGNORE_INDEX, MaskingSpec, MaskingTables, mask_tokens
from .modeling import MaskedLMLoss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that support it, fp16 (with GradScaler) on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """One mixed-precision path: a null context for fp32, so every precision runs the same lines."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]

    @property
    def masked_count(self) -> torch.Tensor:
        return (self.labels != IGNORE_INDEX).sum()


def prepare_batch(raw: dict, epoch: int, spec: MaskingSpec, tables: MaskingTables, device: torch.device) -> Batch:
    """Move a loader batch to the device and mask it there."""
    ids = raw["input_ids"].to(device, non_blocking=True)
    index = raw["index"].to(device, non_blocking=True)
    attn = raw.get("attention_mask")
    masked, labels = mask_tokens(ids, index, epoch, spec, tables)
    return Batch(masked, labels, None if attn is None else attn.to(device, non_blocking=True))


@dataclass
class StepResult:
    """Device tensors; nothing here has been synced to the host."""
    loss_sum: torch.Tensor      # NLL summed over this rank's masked tokens
    masked_tokens: torch.Tensor  # this rank's masked-token count
    tokens: int                 # this rank's input tokens, padding included (known on the host without a sync)
    sequences: int              # this rank's sequences
    sum_sq_lengths: int         # sum of each sequence's padded length squared (attention FLOPs)
    grad_norm: torch.Tensor
    skipped: torch.Tensor       # 1 when the step was skipped (non-finite gradients under fp16)


def train_step(model: nn.Module, loss_module: MaskedLMLoss, optimizer: torch.optim.Optimizer, scheduler,
               scaler: torch.amp.GradScaler, micro_batches: list[Batch], env: DistEnv, precision: str,
               max_grad_norm: float) -> StepResult:
    """One optimizer step over the micro-batches of this rank.

    The gradient is that of (sum of masked-token NLL over the global batch) / (global masked-token count)
    (invariant 2): each micro-batch's NLL sum is scaled by world_size / global_count, and DDP's averaging over
    ranks divides by world_size again.
    """
    local_count = torch.stack([b.masked_count for b in micro_batches]).sum()
    global_count = dist_sum(local_count.clone().float()).clamp(min=1.0)
    scale = env.world_size / global_count
    loss_sum = torch.zeros((), device=env.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # no_sync on every micro-step but the last: one gradient all-reduce per optimizer step.
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast(precision, env.device):
                nll = model(batch.input_ids, batch.labels, batch.attention_mask)
            scaler.scale(nll * scale).backward()
        loss_sum += nll.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(loss_module.parameters(), max_grad_norm or math.inf, foreach=True)
    nonfinite = ~torch.isfinite(grad_norm)  # the same on every rank: DDP has averaged the gradients
    if scaler.is_enabled():
        scaler.step(optimizer)  # skipped by the scaler when the gradients hold inf/nan
        scaler.update()
    else:
        skip_nonfinite_step(optimizer, nonfinite)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    shapes = [b.input_ids.shape for b in micro_batches]
    return StepResult(loss_sum, local_count, tokens=sum(r * w for r, w in shapes),
                      sequences=sum(r for r, _ in shapes), sum_sq_lengths=sum(r * w * w for r, w in shapes),
                      grad_norm=grad_norm.detach(), skipped=nonfinite.long())


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """optimizer.step(), skipped when the gradients are not finite (bf16/fp32, where no GradScaler checks).

    A fused optimizer takes the flag as a device tensor and skips inside its kernel, as under GradScaler, so
    there is no host sync; any other optimizer needs the flag on the host."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.float()  # 0-dim, like the step counters it is subtracted from
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(nonfinite):
        optimizer.step()


def safe_exp(x: float) -> float:
    """Perplexity: inf rather than an OverflowError when the loss is huge."""
    return math.exp(x) if x < 709.0 else math.inf


@torch.no_grad()
def evaluate(loss_module: MaskedLMLoss, loader, env: DistEnv, spec: MaskingSpec, tables: MaskingTables,
             precision: str) -> dict[str, float]:
    """Exact evaluation (invariant 3): every validation example once, fixed masks, the NLL summed over all
    masked tokens of all ranks, then divided once. Runs the unwrapped model: no DDP hooks, no collectives."""
    was_training = loss_module.training
    loss_module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # NLL, correct, masked tokens
    for raw in loader:
        batch = prepare_batch(raw, EVAL_EPOCH, spec, tables, env.device)
        with autocast(precision, env.device):
            nll, correct = loss_module.eval_nll(batch.input_ids, batch.labels, batch.attention_mask)
        totals += torch.stack([nll, correct.double(), batch.masked_count.double()])
    nll_sum, correct, count = dist_sum(totals).tolist()
    loss_module.train(was_training)
    loss = nll_sum / count if count else math.nan
    return {"loss": loss, "perplexity": safe_exp(loss) if count else math.nan,
            "accuracy": correct / count if count else math.nan, "masked_tokens": int(count)}
