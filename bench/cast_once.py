"""Issue 34 (c): autocast's weight casts against a low-precision copy of the weights refreshed once a step.

    python bench/cast_once.py [--out DIR] [--batch 256] [--seq 128] [--steps 20] [--warmup 5] [--dry_run]

Both sides train the bert-base architecture (BertForMaskedLM from BertConfig(), random weights, SDPA attention) on
the same random masked batches (15% of the positions), under torch.autocast in the card's precision (bf16 from
compute capability 8.0, else fp16 with GradScaler), with fused AdamW on fp32 master weights and clipping at 1.0:
  autocast: every nn.Linear keeps its fp32 weight; autocast casts it at its use, once a forward (its cast cache),
            and its gradient is accumulated into the fp32 weight.
  copy:     every nn.Linear computes with a bf16/fp16 copy of its weight, which autocast leaves as it is; before
            the optimizer step one torch._foreach_copy_ moves the copies' gradients into the masters' fp32 .grad,
            after it one torch._foreach_copy_ refreshes the copies from the masters. (The decoder, whose weight is
            the word embeddings', keeps the fp32 weight: its gradient must add to the embeddings'.)
Per side: milliseconds a step, kernels a step (torch.profiler, 3 steps), and the loss of the last timed step (the
two agree to the precision's rounding). The sides alternate, --repeats runs each; medians. Writes OUT/cast_once.md
and .json. Asserts nothing. --dry_run: a tiny BERT on the CPU in bf16, 2 steps: checks the script, measures
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import common  # noqa: F401 - the offline environment and the repository on sys.path
import gpu_throughput
import torch
from gpu_throughput import time_and_profile

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def build_model(tiny: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else {}
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**small)).to(DEVICE).train()


def batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """n masked batches: 15% of the positions hold [MASK] (id 103) and are labelled with the original id."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, seq), generator=g)
        masked = torch.rand(batch, seq, generator=g) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        inputs = torch.where(masked, torch.full_like(ids, 103), ids)
        out.append({"input_ids": inputs.to(DEVICE), "labels": labels.to(DEVICE)})
    return out


class WeightCopies:
    """A low-precision copy of every nn.Linear weight (but one tied to another module's), the forward's weight;
    the fp32 masters stay with the optimizer."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        tied = model.get_input_embeddings().weight
        self.masters, self.copies = [], []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is not tied:
                master = module.weight
                copy = torch.nn.Parameter(master.detach().to(dtype))
                module.weight = copy  # the forward now reads the copy; autocast has nothing to cast
                master.grad = torch.zeros_like(master)
                self.masters.append(master)
                self.copies.append(copy)
        copied = {id(c) for c in self.copies}
        self.others = [p for p in model.parameters() if id(p) not in copied]

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the masters and every parameter without a copy."""
        return self.masters + self.others

    @torch.no_grad()
    def gradients_to_masters(self) -> None:
        torch._foreach_copy_([m.grad for m in self.masters], [c.grad for c in self.copies])

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self.copies, self.masters)
        for c in self.copies:
            c.grad = None


def run(side: str, data: list, dtype: torch.dtype, warmup: int, steps: int, tiny: bool) -> dict:
    model = build_model(tiny)
    copies = WeightCopies(model, dtype) if side == "copy" else None
    params = copies.parameters() if copies else list(model.parameters())
    fused = DEVICE.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=dtype == torch.float16)
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        with torch.autocast(DEVICE.type, dtype=dtype):
            out = model(**data[i % len(data)])
        scaler.scale(out.loss).backward()
        if copies:
            copies.gradients_to_masters()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)
        if copies:
            copies.refresh()
        if i == warmup + steps - 1:
            losses.append(out.loss.detach())  # read after the timing: .item() would wait for the device

    timed = time_and_profile(step, warmup, steps)
    return {
        "ms_per_step": 1000 * timed["seconds"] / steps,
        "kernels_per_step": timed["kernels_per_step"],
        "loss": losses[0].item(),
    }


def main() -> None:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dry_run", action="store_true")
    a = p.parse_args()
    if a.dry_run:
        DEVICE = gpu_throughput.DEVICE = torch.device("cpu")
        a.batch, a.seq, a.warmup, a.steps, a.repeats = 4, 32, 1, 2, 1
    native_bf16 = DEVICE.type == "cpu" or torch.cuda.get_device_capability(0) >= (8, 0)
    dtype = torch.bfloat16 if native_bf16 else torch.float16
    data = batches(4, a.batch, a.seq, 30522)
    results: dict[str, list[dict]] = {"autocast": [], "copy": []}
    for _ in range(a.repeats):
        for side in results:
            results[side].append(run(side, data, dtype, a.warmup, a.steps, a.dry_run))
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "CPU (dry run)"
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    lines = [
        f"Weight casts, {name}: {'a tiny BERT' if a.dry_run else 'bert-base architecture'}, {a.seq} x {a.batch}, "
        f"{'bf16' if dtype == torch.bfloat16 else 'fp16 + GradScaler'}, eager; {a.warmup} warm-up + {a.steps} "
        f"timed steps, {a.repeats} runs per side alternated, medians",
        "",
        "| weights | ms / step | kernels / step | loss at the last step |",
        "| --- | --- | --- | --- |",
        *(
            f"| {side} | {m['ms_per_step']:.2f} | {m['kernels_per_step']:.0f} | {m['loss']:.4f} |"
            for side, m in med.items()
        ),
        "",
        f"copy / autocast step time: {med['copy']['ms_per_step'] / med['autocast']['ms_per_step']:.3f}",
    ]
    table = "\n".join(lines)
    print(table, flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cast_once.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(a.out, "cast_once.json"), "w") as fh:
        json.dump({"device": name, "runs": results, "medians": med}, fh, indent=1)


if __name__ == "__main__":
    main()
