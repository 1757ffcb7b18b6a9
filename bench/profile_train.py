"""Where a training step's time goes: torch.profiler over our step (the path bench/train_throughput.py times).

    python bench/profile_train.py [--steps 4] [--batch_size 16] [--seq 128]

Runs `train_throughput.run_ours` (MiniLM, WikiText-2 chunks, fp32, CPU), profiling --steps steps after 2 warm-up
steps (model building excluded), and prints self CPU time by operator family: the matmuls (mm, addmm, bmm and
the attention kernel),
which the MFU counts, against everything else (softmax, GELU, LayerNorm, dropout, embedding, the optimizer,
masking...), and the top operators. This is the evidence for what bounds the MFU on a CPU.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import common
import train_throughput as tt

MATMUL = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::matmul",
    "aten::linear",
)


def family(name: str) -> str:
    if name in MATMUL or "scaled_dot_product" in name:
        return "matmul + attention kernels"
    if "adam" in name.lower() or "_foreach" in name or "fused" in name:
        return "optimizer"
    if any(k in name for k in ("gelu", "layer_norm", "softmax", "dropout", "native_dropout", "tanh")):
        return "elementwise / norm / softmax / dropout"
    if any(k in name for k in ("embedding", "index", "gather", "scatter", "masked", "nonzero", "where")):
        return "embedding / gather / masking"
    if any(k in name for k in ("copy_", "to", "clone", "cat", "stack", "contiguous", "fill_", "zero_", "empty")):
        return "copies / allocation"
    if any(k in name for k in ("add", "mul", "div", "sub", "sum", "mean", "norm", "sqrt", "exp", "log")):
        return "other arithmetic and reductions"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--train_file", default=os.path.join(common.WIKITEXT, "wiki.train.raw"))
    a = p.parse_args()
    common.quiet_transformers()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    cfg = tt.TrainConfig(
        model_name_or_path=common.minilm_path(),
        per_device_train_batch_size=a.batch_size,
        max_seq_length=a.seq,
        precision="fp32",
        attn_implementation="sdpa",
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    chunks = tt.load_chunks(a.train_file, tokenizer, a.seq)
    prof = profile(activities=[ProfilerActivity.CPU])
    seconds, _ = tt.run_ours(cfg, tokenizer, chunks, warmup=2, steps=a.steps, profiler=prof)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_family: dict[str, float] = defaultdict(float)
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
    print(
        f"== profile of our training step: MiniLM, batch {a.batch_size} x seq {a.seq}, fp32, "
        f"{torch.get_num_threads()} threads; {a.steps} steps profiled after 2 warm-up steps, "
        f"{seconds:.2f} s ==\n"
        f"machine   {common.machine()}\nversions  {common.versions()}\n"
        f"self CPU time by operator family (the profiled steps only):"
    )
    for name, t in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<42} {t / 1e6:8.2f} s  {t / total:6.1%}")
    print("top operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(
            f"  {e.key:<60} {e.self_cpu_time_total / 1e6:8.3f} s  {e.self_cpu_time_total / total:6.1%}  calls {e.count}"
        )


if __name__ == "__main__":
    main()
