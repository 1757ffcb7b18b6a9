"""Throughput figures: model FLOPs of an MLM step, the device's peak, MFU, and peak memory.

MFU = model FLOPs the step needs / seconds / peak FLOP/s. "Needed" counts what an MLM step must compute:
the encoder on every token, attention, and the prediction head at the masked positions only (this project
runs it nowhere else). Embedding lookups, LayerNorm, softmax and the optimizer are not matmuls and are left
out, as in the usual 6 x parameters x tokens estimate.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) fp16/bf16 peaks in FLOP/s from the vendors' data sheets, by the words of the name torch
# reports ("Tesla V100-PCIE-16GB", "NVIDIA H100 80GB HBM3"). The entry whose words are all in the name and
# that has the most words wins, so a V100 PCIe is not taken for an SXM2 part, and whole words must match, so
# an "L40" is not an "L4" and an "A10G" (not listed: measured) is not an "A10". Cards before Volta (P100) have
# no tensor cores: their figure is the fp16 vector rate. Cards before Ampere have no bf16 at all.
GPU_PEAKS: dict[str, float] = {
    "P100": 18.7e12,
    "P100 PCIE": 18.7e12,
    "P100 SXM2": 21.2e12,
    "V100": 125e12,
    "V100 SXM2": 125e12,
    "V100 PCIE": 112e12,
    "V100S": 130e12,
    "T4": 65e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40": 181e12,
    "L40S": 362e12,
    "H100": 989e12,
    "H100 PCIE": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
}


def _words(name: str) -> list[str]:
    return re.sub(r"[^0-9A-Za-z]+", " ", name).upper().split()


def data_sheet_peak(name: str) -> tuple[str, float] | None:
    """(table entry, dense fp16/bf16 FLOP/s) of the most specific entry matching a GPU name, or None."""
    words = set(_words(name))
    found = [(len(_words(key)), key) for key in GPU_PEAKS if set(_words(key)) <= words]
    if not found:
        return None
    key = max(found)[1]
    return key, GPU_PEAKS[key]


@dataclass(frozen=True)
class MlmShape:
    """What the FLOPs of a BERT-like encoder depend on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> MlmShape:
        get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)
        return cls(
            layers=get("num_hidden_layers", "n_layers"),
            hidden=get("hidden_size", "dim"),
            intermediate=get("intermediate_size", "hidden_dim"),
            vocab=get("vocab_size"),
        )


@dataclass(frozen=True)
class Throughput:
    """What MFU is computed from: the model's shape (its FLOPs per token) and the summed peak of all ranks."""

    shape: MlmShape
    peak_flops: float


def mlm_step_flops(shape: MlmShape, tokens: float, sum_sq_lengths: float, masked_tokens: float) -> float:
    """Training FLOPs (forward + backward = 3 x forward; 2 FLOPs per multiply-add) of one MLM step.

    tokens:          input tokens of the step (sequences x padded length)
    sum_sq_lengths:  sum over sequences of length^2 (attention scores and their use cost length^2 each)
    masked_tokens:   positions where the prediction head runs
    per token, per layer:  Q, K, V, O projections 4*h*h, feed-forward 2*h*ffn multiply-adds
    per sequence, layer:   Q K^T and (softmax) V, 2 * length^2 * h multiply-adds
    per masked token:      head transform h*h and decoder h*vocab multiply-adds
    """
    h, L = shape.hidden, shape.layers
    encoder = 2 * L * (4 * h * h + 2 * h * shape.intermediate) * tokens
    attention = 2 * L * 2 * h * sum_sq_lengths
    head = 2 * (h * h + h * shape.vocab) * masked_tokens
    return 3.0 * (encoder + attention + head)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on this device and thread count: the measured ceiling."""
    # A private generator: drawing from the global one would shift the dropout stream of a resumed run.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): a data-sheet value for known GPUs in bf16/fp16,
    otherwise a short matmul measured now (CPU; fp32 on GPU; unknown GPUs)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        known = data_sheet_peak(name)
        if known is not None:
            return known[1], f"{name}: {known[0]} data sheet, dense {precision}"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return matmul_peak(device, dtype, n=4096, reps=10), f"{name}: measured {precision} matmul (not in the table)"
    n = 4096 if device.type == "cuda" else 1024
    return matmul_peak(device, torch.float32, n=n), f"measured fp32 matmul ({torch.get_num_threads()} threads)"


def peak_memory_bytes(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) peak bytes of this rank: on a GPU the tensors' peak and the peak the caching
    allocator held (what other processes and an OOM see); on CPU this process's largest resident set, twice."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    return rss, rss
