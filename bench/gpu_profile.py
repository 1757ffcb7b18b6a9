"""Where a GPU training step's time goes: the host's time to issue a step vs the device's busy time.

    python bench/gpu_profile.py --assets DIR --out DIR [--budget_s 200] [--dry_run]

bench/gpu_throughput.py gives samples/s and MFU; this says why they are what they are. For each row (bert-base
architecture, random weights, the step train_ddp.py runs: train_step over batches that prepare_batch has already
masked and moved, so data loading is out of the picture) it prints:
  wall ms/step     one step's wall-clock time over --steps steps (synchronised at the two ends only)
  host ms/step     the time train_step takes to return (it never waits for the GPU, so this is the host's cost
                   of issuing the step's kernels); host close to wall means the GPU waits for the host
  busy ms/step     the sum of the step's CUDA kernel times (torch.profiler, 3 steps); busy / wall is how much
                   of the time the GPU computes
  kernels/step     how many kernels a step launches
  MFU              model FLOPs (mlm_step_flops) / wall time / the data-sheet peak
and the top kernels of the first row by device time. Rows: 128 x 64 bf16 (the headline), 128 x 256 bf16 (4x the
work per launch: if samples/s scales with it, the step is launch-bound), 128 x 64 fp16 + GradScaler, 512 x 16
bf16, then 128 x 64 bf16 with --torch_compile. Writes OUT/gpu_profile.md. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import common
import torch
from gpu_throughput import DRY_RUN, bert_base, bert_config, kernel_times, load_chunks
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import GlobalOrderSampler
from mlm.report.metrics import MlmShape, device_peak, mlm_step_flops
from mlm.train.engine import build_masking, build_trainable, prepare_batch, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_row(
    seq: int,
    batch: int,
    precision: str,
    compiled: bool,
    chunks,
    tokenizer,
    device: torch.device,
    warmup: int,
    steps: int,
) -> dict:
    cfg = TrainConfig(learning_rate=5e-5, num_warmup_steps=0, per_device_train_batch_size=batch, torch_compile=compiled)
    trainable = build_trainable(cfg, bert_base().to(device), precision, device, warmup + steps + 10)
    trainable.loss.train()
    masking = build_masking(cfg, tokenizer)
    sampler = GlobalOrderSampler(chunks, 1, 0, cfg.seed)
    loader = DataLoader(chunks, batch_size=batch, sampler=sampler, collate_fn=lambda b: b, drop_last=True)
    batches = []
    for raw in loader:  # masked and on the device before timing: the step alone is measured
        batches.append(prepare_batch(raw, 0, masking, device))
        if len(batches) == 8:
            break
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    for i in range(warmup):
        train_step(trainable, [batches[i % len(batches)]], env)
    sync(device)
    host = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        h = time.perf_counter()
        train_step(trainable, [batches[i % len(batches)]], env)
        host += time.perf_counter() - h
    sync(device)
    wall = (time.perf_counter() - t0) / steps
    profiled = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(profiled):
            train_step(trainable, [batches[i % len(batches)]], env)
        sync(device)
    busy, kernels, top = kernel_times(prof) if device.type == "cuda" else (0.0, 0, [])
    shape = MlmShape.from_config(bert_config())
    flops = mlm_step_flops(shape, seq * batch, batch * seq**2, 0.15 * (seq - 2) * batch)
    peak, _ = device_peak(device, "bf16" if precision == "bf16" else "fp16")
    attn = getattr(trainable.loss.model.config, "_attn_implementation", "?")
    del trainable
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "row": f"{seq} x {batch}, {precision}{', compiled' if compiled else ''}",
        "attn": attn,
        "wall_ms": wall * 1e3,
        "host_ms": host / steps * 1e3,
        "busy_ms": busy / profiled * 1e3,
        "kernels": kernels / profiled,
        "samples_s": batch / wall,
        "mfu": flops / wall / peak,
        "top": [(n, s / profiled * 1e3, c // profiled) for n, s, c in top[:12]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default=os.environ.get("MLM_GPU_ASSETS", ".gpu-assets"))
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--budget_s", type=float, default=200.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dry_run", action="store_true", help="a tiny BERT on the CPU: checks the script")
    a = p.parse_args()
    device = torch.device("cuda", 0)
    if a.dry_run:
        device, DRY_RUN["on"] = torch.device("cpu"), True
        a.warmup, a.steps = 1, 2
    start = time.perf_counter()
    common.quiet_transformers()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(a.assets, "tokenizer"))
    wikitext = os.path.join(a.assets, "wikitext-2-raw-v1")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fp16_ok = device.type == "cuda"
    rows = (
        [(128, 64, "bf16", False), (128, 256, "bf16", False)]
        + ([(128, 64, "fp16", False)] if fp16_ok else [])
        + [(512, 16, "bf16", False), (128, 64, "bf16", True)]
    )
    chunks = {}
    results = []
    for seq, batch, precision, compiled in rows:
        left = a.budget_s - (time.perf_counter() - start)
        if left < (90 if compiled else 25):
            print(f"{seq} x {batch}, {precision}, compiled={compiled}: not run ({left:.0f} s left)", flush=True)
            continue
        if seq not in chunks:
            chunks[seq] = load_chunks(tokenizer, wikitext, seq)
        r = profile_row(seq, batch, precision, compiled, chunks[seq], tokenizer, device, a.warmup, a.steps)
        results.append(r)
        print(
            f"{r['row']}: wall {r['wall_ms']:.1f} ms, host {r['host_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, "
            f"{r['kernels']:.0f} kernels, {r['samples_s']:.0f} samples/s, MFU {r['mfu']:.3f}, attn {r['attn']}",
            flush=True,
        )
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    lines = [
        f"Step profile, {name}; {common.versions()}; {a.warmup} warm-up + {a.steps} timed steps, 3 profiled",
        "",
        "| row | wall ms/step | host ms/step | busy ms/step | busy / wall | kernels/step | samples/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['wall_ms']:.1f} | {r['host_ms']:.1f} | {r['busy_ms']:.1f} | "
            f"{r['busy_ms'] / r['wall_ms']:.2f} | {r['kernels']:.0f} | {r['samples_s']:.0f} | {r['mfu']:.3f} |"
        )
    if results and results[0]["top"]:
        lines += ["", f"Top kernels, {results[0]['row']} (ms per step, launches per step):", ""]
        lines += [f"- {s:.2f} ms x{c}: {n[:110]}" for n, s, c in results[0]["top"]]
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_profile.md"), "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
