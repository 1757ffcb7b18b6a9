"""One optimizer step (accumulation, no_sync, autocast, GradScaler, clipping) and the exact evaluation pass."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mlm.common.cli import UserError
from mlm.common.distributed import DistEnv, dist_sum
from mlm.config import TrainConfig
from mlm.data.masking import (
    EVAL_EPOCH,
    IGNORE_INDEX,
    MaskingSpec,
    MaskingTables,
    build_masking_tables,
    mask_tokens,
    masked_capacity,
    masked_slots,
)
from mlm.model.modeling import MaskedLMLoss, masked_positions
from mlm.train.optim import AppliedStepSchedule, build_optimizer, build_scheduler, skip_nonfinite_step

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16 = (8, 0)  # compute capability from which bf16 runs natively on tensor cores (Ampere)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in (invariant 10 of docs/DESIGN.md: auto never picks an emulated dtype).

    auto: bf16 on GPUs of compute capability 8.0 and up, fp16 with GradScaler on older GPUs (T4, V100, P100),
    fp32 on CPU. torch.cuda.is_bf16_supported() is not asked: it answers True on a T4 or a P100, where bf16
    is emulated without tensor cores (slower than fp16). An explicit bf16 on such a GPU is a user error."""
    if device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    capability = torch.cuda.get_device_capability(device)
    native_bf16 = tuple(capability) >= NATIVE_BF16
    if precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and not native_bf16:
        name = torch.cuda.get_device_name(device)
        raise UserError(
            f"--precision bf16: the {name} (compute capability {capability[0]}.{capability[1]}) has no "
            "native bf16, so bf16 would be emulated without tensor cores (slower than fp16); use "
            "--precision fp16 or auto (fp16 with GradScaler on this GPU)"
        )
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """One mixed-precision path: a null context for fp32, so every precision runs the same lines."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class Scaler(torch.amp.GradScaler):
    """GradScaler, enabled for fp16 only, that also resumes from a checkpoint written without one."""

    def load_state_dict(self, state_dict: dict) -> None:
        # A disabled scaler (bf16 or fp32) saves {}, which GradScaler refuses: an fp16 run resumed from such a
        # checkpoint (an A100 run moved to a T4, a CPU run moved to a GPU) starts with a fresh loss scale.
        if self.is_enabled() and not state_dict:
            return
        super().load_state_dict(state_dict)


def build_scaler(precision: str, device: torch.device) -> Scaler:
    return Scaler(device.type, enabled=precision == "fp16")


@dataclass(frozen=True)
class Masking:
    """How batches are masked: the 80/10/10 rule and the vocabulary tables it reads (on the host); evaluation
    may select at another rate (--eval_mlm_probability)."""

    spec: MaskingSpec
    tables: MaskingTables
    eval_probability: Optional[float] = None  # None: the training rate

    def for_evaluation(self) -> Masking:
        if self.eval_probability is None:
            return self
        return Masking(replace(self.spec, mlm_probability=self.eval_probability), self.tables)


@dataclass(frozen=True, kw_only=True)
class Trainable:
    """What an optimizer step runs and changes. `wrapped` is what forward and backward go through (`loss` under
    DDP, or `loss` itself in a world of one); `loss.model` is the Hugging Face model that is saved and exported."""

    wrapped: nn.Module
    loss: MaskedLMLoss
    optimizer: torch.optim.Optimizer
    schedule: AppliedStepSchedule
    scaler: torch.amp.GradScaler
    precision: str
    max_grad_norm: float


def describe_precision(trainable: Trainable) -> str:
    """ "fp16 + GradScaler", "bf16", "fp32": what the banner and the model card say."""
    return trainable.precision + (" + GradScaler" if trainable.scaler.is_enabled() else "")


def build_masking(cfg: TrainConfig, tokenizer) -> Masking:
    tables = build_masking_tables(tokenizer)  # on the host: prepare_batch masks there
    if cfg.whole_word_mask and tables.word_convention is None:
        raise UserError(
            "--whole_word_mask needs a vocabulary that marks words (WordPiece '##' pieces, byte-level "
            "BPE 'Ġ' or SentencePiece '▁' word starts); this tokenizer's shows none, so train without "
            "--whole_word_mask"
        )
    spec = MaskingSpec(
        cfg.mlm_probability, cfg.mask_replace_prob, cfg.random_replace_prob, cfg.whole_word_mask, cfg.seed
    )
    return Masking(spec, tables, cfg.eval_mlm_probability)


def build_trainable(
    cfg: TrainConfig, model: nn.Module, precision: str, device: torch.device, total_steps: int, global_batch: int = 1
) -> Trainable:
    """The loss module around the model (not yet under DDP), fused AdamW, the schedule and the scaler.
    global_batch: examples per optimizer step, which the schedule counts in (a resume with another continues
    it by examples seen)."""
    loss = MaskedLMLoss(
        model,
        compile_training=cfg.torch_compile,
        label_smoothing=cfg.label_smoothing,
        compile_mode=cfg.torch_compile_mode,
    )
    optimizer = build_optimizer(cfg, loss, device)
    return Trainable(
        wrapped=loss,
        loss=loss,
        optimizer=optimizer,
        schedule=build_scheduler(cfg, optimizer, total_steps, global_batch),
        scaler=build_scaler(precision, device),
        precision=precision,
        max_grad_norm=cfg.max_grad_norm,
    )


@dataclass
class Batch:
    """A masked micro-batch on the device, with what the host knows of it without asking the device."""

    input_ids: torch.Tensor  # [B, T] after masking
    attention_mask: Optional[torch.Tensor]  # [B, T], or None for packed chunks (no padding)
    positions: torch.Tensor  # [S] flat indices (row * T + column) of the masked tokens, then padding slots
    targets: torch.Tensor  # [S] the original token ids there, then IGNORE_INDEX (weight zero in the loss)
    masked_count: int  # M <= S, the real masked tokens
    sequences: int  # real examples (rows added to fill a fixed shape not counted)

    @property
    def tokens(self) -> int:
        return self.sequences * self.input_ids.shape[1]


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors to the device in one copy, from pinned memory on CUDA so that it does not wait."""
    if device.type == "cpu":
        return tensors
    flat = [t.reshape(-1) for t in tensors]
    buffer = torch.empty(sum(t.numel() for t in flat), dtype=torch.int64, pin_memory=device.type == "cuda")
    torch.cat(flat, out=buffer)
    moved = buffer.to(device, non_blocking=True).split([t.numel() for t in flat])
    return [m.view(t.shape) for m, t in zip(moved, tensors)]


def prepare_batch(raw: dict, epoch: int, masking: Masking, device: torch.device) -> Batch:
    """Mask a loader batch on the host, then move it to the device.

    The masks are a pure function of (seed, epoch, index, position), so they are the same wherever they are
    computed; computing them where the batch already is tells the host which positions are masked and how
    many, so the head can gather them on the device without a host-device sync (a boolean index would wait
    for the GPU at every micro-step)."""
    ids, index = raw["input_ids"], raw["index"]
    masked, labels = mask_tokens(ids, index, epoch, masking.spec, masking.tables)
    positions, targets = masked_positions(labels)
    count = int(positions.numel())
    # Fixed shapes: the positions padded to the capacity of this batch shape (masking.masked_capacity).
    slots = masked_slots(count, masked_capacity(*ids.shape, masking.spec), ids.numel())
    positions = F.pad(positions, (0, slots - count))  # position 0: a real row, its slot's label is ignored
    targets = F.pad(targets, (0, slots - count), value=IGNORE_INDEX)
    attn = raw.get("attention_mask")
    moved = to_device([masked, positions, targets] + ([attn] if attn is not None else []), device)
    return Batch(
        moved[0],
        moved[3] if attn is not None else None,
        moved[1],
        moved[2],
        masked_count=count,
        sequences=int((index >= 0).sum()),
    )


@dataclass
class StepResult:
    """Device tensors (nothing here has been synced to the host) and counts the host knew anyway."""

    loss_sum: torch.Tensor  # NLL summed over this rank's masked tokens
    masked_tokens: int  # this rank's masked-token count
    tokens: int  # this rank's input tokens of real examples, padding included
    sequences: int  # this rank's real examples
    sum_sq_lengths: int  # sum of each example's padded length squared (attention FLOPs)
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # 1 when the step was skipped (non-finite gradients), on the device


def train_step(t: Trainable, micro_batches: list[Batch], env: DistEnv, train_encoder: bool = True) -> StepResult:
    """One optimizer step over the micro-batches of this rank; no host-device sync.

    The gradient is that of (sum of masked-token NLL over the global batch) / (global masked-token count)
    (invariant 2): each micro-batch's NLL sum is scaled by world_size / global_count, and DDP's averaging over
    ranks divides by world_size again.

    train_encoder=False (--head_warmup_steps): the encoder's gradients are dropped after the all-reduce, so the
    optimizer, which skips a parameter without a gradient, leaves its weights and its moments exactly as they
    were, and clipping measures the head alone.
    """
    local_count = sum(b.masked_count for b in micro_batches)
    # torch.full, not torch.tensor: a fill kernel takes the host number, a copy would wait for the stream.
    global_count = dist_sum(torch.full((), float(local_count), device=env.device)).clamp(min=1.0)
    scale = env.world_size / global_count
    loss_sum = torch.zeros((), device=env.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # no_sync on every micro-step but the last: one gradient all-reduce per optimizer step.
        sync = contextlib.nullcontext() if last or not isinstance(t.wrapped, DDP) else t.wrapped.no_sync()
        with sync:
            with autocast(t.precision, env.device):
                nll = t.wrapped(batch.input_ids, batch.positions, batch.targets, batch.attention_mask)
            t.scaler.scale(nll * scale).backward()
        loss_sum += nll.detach()
    if not train_encoder:
        for p in t.loss.encoder_parameters():
            p.grad = None
    t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(t.loss.parameters(), t.max_grad_norm or math.inf, foreach=True)
    nonfinite = ~torch.isfinite(grad_norm)  # the same on every rank: DDP has averaged the gradients
    if t.scaler.is_enabled():
        t.scaler.step(t.optimizer)  # skipped by the scaler when the gradients hold inf/nan (the same test)
        t.scaler.update()
    else:
        skip_nonfinite_step(t.optimizer, nonfinite)
    skipped = nonfinite.long()
    t.schedule.step(skipped)  # a skipped step does not advance the schedule
    t.optimizer.zero_grad(set_to_none=True)
    widths = [b.input_ids.shape[1] for b in micro_batches]
    return StepResult(
        loss_sum,
        local_count,
        tokens=sum(b.tokens for b in micro_batches),
        sequences=sum(b.sequences for b in micro_batches),
        sum_sq_lengths=sum(b.sequences * w * w for b, w in zip(micro_batches, widths)),
        grad_norm=grad_norm.detach(),
        skipped=skipped,
    )


def safe_exp(x: float) -> float:
    """Perplexity: inf rather than an OverflowError when the loss is huge."""
    return math.exp(x) if x < 709.0 else math.inf


# What evaluate() returns: the figures, then how many examples they counted of how many the split has (fewer
# only when --max_eval_samples capped it).
EVAL_METRICS = ("loss", "perplexity", "accuracy", "masked_tokens", "examples", "split_examples")


@torch.no_grad()
def evaluate(loss_module: MaskedLMLoss, loader, env: DistEnv, masking: Masking, precision: str) -> dict[str, float]:
    """Exact evaluation (invariant 3): every validation example once, fixed masks, the NLL summed over all
    masked tokens of all ranks, then divided once. Runs the unwrapped model: no DDP hooks, no collectives."""
    was_training = loss_module.training
    loss_module.eval()
    masking = masking.for_evaluation()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # NLL, correct
    count = 0  # masked tokens, known on the host
    for raw in loader:
        batch = prepare_batch(raw, EVAL_EPOCH, masking, env.device)
        with autocast(precision, env.device):
            nll, correct = loss_module.eval_nll(batch.input_ids, batch.positions, batch.targets, batch.attention_mask)
        totals += torch.stack([nll, correct.double()])
        count += batch.masked_count
    totals = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64).to(env.device)])
    nll_sum, correct, count = dist_sum(totals).tolist()
    loss_module.train(was_training)
    loss = nll_sum / count if count else math.nan
    dataset = loader.dataset
    return {
        "loss": loss,
        "perplexity": safe_exp(loss) if count else math.nan,
        "accuracy": correct / count if count else math.nan,
        "masked_tokens": int(count),
        "examples": len(dataset),
        "split_examples": int(getattr(dataset, "available", len(dataset))),
    }
