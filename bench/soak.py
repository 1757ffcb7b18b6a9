"""Memory over a long run: does a training process's resident memory keep rising, or plateau?

    python bench/soak.py [--model tiny|minilm] [--steps N] [--every 100] [--out FILE.json]

Runs train_ddp.main in this process (a world of one, as `python train_ddp.py` runs it) on WikiText-2 with
evaluations, checkpoints, history and W&B (offline) as a user has them, and every --every optimizer steps
records: the resident set (VmRSS) and its peak so far (VmHWM) from /proc/self/status; glibc's heap (mallinfo2:
bytes in use by live allocations vs bytes the heap holds from the system, so that a growth of freed-but-kept
memory is told apart from a growth of live objects); Python's live objects (gc) and the training history's
length. Defaults: tiny BERT 3,000 steps; MiniLM 600 steps (batch 16 x 128, fp32, every core). Prints a table
and the growth per 100 steps over the second half of the run; asserts nothing. Linux only (/proc, glibc).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import tempfile
import time

import common
import torch

import train_ddp
from mlm.train import loop


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> tuple[float, float]:
    """(MiB in use by live malloc allocations, MiB the heap holds from the system) from glibc's mallinfo2."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20, (m.arena + m.hblkhd) / 2**20


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="default: 3000 (tiny), 600 (minilm)")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default=None, help="also write the samples as JSON here")
    a = p.parse_args()
    steps = a.steps or (3000 if a.model == "tiny" else 600)
    common.quiet_transformers()
    work = tempfile.mkdtemp(prefix="mlm-soak-")
    if a.model == "tiny":
        from transformers import BertConfig

        config = os.path.join(work, "config")
        BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        ).save_pretrained(config)
        model = [
            "--config_name",
            config,
            "--tokenizer_name",
            str(common.minilm_path()),
            "--max_seq_length",
            "64",
            "--per_device_train_batch_size",
            "16",
        ]
        cadence = 500
    else:
        model = [
            "--model_name_or_path",
            str(common.minilm_path()),
            "--max_seq_length",
            "128",
            "--per_device_train_batch_size",
            "16",
        ]
        cadence = 200
    args = model + [
        "--dataset_dir",
        common.WIKITEXT,
        "--output_dir",
        os.path.join(work, "run"),
        "--data_cache_dir",
        os.path.join(work, "cache"),
        "--max_train_steps",
        str(steps),
        "--eval_steps",
        str(cadence),
        "--save_steps",
        str(cadence),
        "--max_eval_samples",
        "128",
        "--precision",
        "fp32",
        "--report_to",
        "all",
        "--eval_on_start",
        "false",
    ]
    os.environ.setdefault("WANDB_MODE", "offline")
    samples: list[dict] = []
    original = loop.train_step
    t0 = time.perf_counter()

    def train_step(*args_, **kwargs):
        result = original(*args_, **kwargs)
        train_step.done += 1
        if train_step.done == 1 or train_step.done % a.every == 0:
            used, held = heap()
            samples.append(
                {
                    "step": train_step.done,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "rss_gib": status()["VmRSS"],
                    "peak_rss_gib": status()["VmHWM"],
                    "heap_in_use_mib": used,
                    "heap_held_mib": held,
                    "gc_objects": len(gc.get_objects()),
                }
            )
        return result

    train_step.done = 0
    loop.train_step = train_step
    try:
        code = train_ddp.main(args)
    finally:
        loop.train_step = original
        shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"the run failed with exit code {code}")
    print(
        f"soak: {a.model}, {steps} steps, {common.machine()}, torch threads {torch.get_num_threads()}; "
        f"{common.versions()}"
    )
    print("| step | s | RSS GiB | peak RSS GiB | heap in use MiB | heap held MiB | Python objects |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in samples:
        print(
            f"| {s['step']} | {s['seconds']} | {s['rss_gib']:.3f} | {s['peak_rss_gib']:.3f} | "
            f"{s['heap_in_use_mib']:.1f} | {s['heap_held_mib']:.1f} | {s['gc_objects']} |"
        )
    half = [s for s in samples if s["step"] >= steps // 2]
    if len(half) >= 2:
        span = (half[-1]["step"] - half[0]["step"]) / 100
        print(
            f"second half (steps {half[0]['step']}-{half[-1]['step']}): RSS "
            f"{(half[-1]['rss_gib'] - half[0]['rss_gib']) * 1024 / span:+.2f} MiB per 100 steps, heap in use "
            f"{(half[-1]['heap_in_use_mib'] - half[0]['heap_in_use_mib']) / span:+.2f} MiB per 100 steps, "
            f"Python objects {(half[-1]['gc_objects'] - half[0]['gc_objects']) / span:+.0f} per 100 steps"
        )
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(samples, fh, indent=1)


if __name__ == "__main__":
    main()
