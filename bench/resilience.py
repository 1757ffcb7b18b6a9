"""What never losing work costs: checkpoint save/load time for MiniLM, and SIGTERM-to-exit of a real 2-rank run.

    python bench/resilience.py [--repeats 3] [--steps_before_signal 3]

1. Save: `mlm.train.checkpoint.save_checkpoint` (weights as safetensors, AdamW state after one step, scheduler,
   scaler, RNG states, manifest with SHA-256, fsync, rename) for MiniLM with its MLM head; then the load
   `auto` resume does (hash check + `load_checkpoint`). Medians of --repeats, with the checkpoint's size.
2. SIGTERM: train_ddp.py as 2 CPU ranks started by hand (MiniLM, WikiText-2, sequence 128, batch 8 per rank),
   SIGTERM to rank 1 once step --steps_before_signal is logged; the time until both ranks have exited (the
   agreed stop, one checkpoint written, exit 143), and the steps the checkpoint holds.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import common


def bench_save(repeats: int) -> None:
    import torch
    from transformers import AutoModelForMaskedLM

    from mlm.train import checkpoint

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(common.minilm_path())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    parts = {
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "rng_states": checkpoint.RankRngs(0, [checkpoint.rng_state()] * 2),
    }
    ids = torch.randint(1000, 2000, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            state = checkpoint.TrainState(step=len(saves) + 1, world_size=2, per_device_train_batch_size=8)
            t0 = time.perf_counter()
            path = checkpoint.save_checkpoint(out, state, model, parts, save_total_limit=1)
            saves.append(time.perf_counter() - t0)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            t0 = time.perf_counter()
            chosen = checkpoint.latest_complete_checkpoint(out)  # verifies every file's SHA-256
            checkpoint.load_checkpoint(
                chosen,
                checkpoint.TrainState(world_size=2, per_device_train_batch_size=8),
                model,
                parts,
                torch.device("cpu"),
            )
            loads.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"checkpoint       MiniLM + MLM head, {params / 1e6:.1f}M parameters, {size / 2**20:.1f} MiB on disk "
        f"(weights + AdamW moments + RNG + manifest)\n"
        f"  save           {common.fmt_runs(saves, 's')}  (write, SHA-256 manifest, fsync, rename)\n"
        f"  load           {common.fmt_runs(loads, 's')}  (auto: verify hashes, then load)",
        flush=True,
    )


def bench_sigterm(steps_before_signal: int, out: str) -> None:
    args = [
        "--model_name_or_path",
        common.minilm_path(),
        "--dataset_dir",
        common.WIKITEXT,
        "--output_dir",
        out,
        "--max_seq_length",
        "128",
        "--per_device_train_batch_size",
        "8",
        "--max_train_steps",
        "1000",
        "--logging_steps",
        "1",
        "--eval_on_start",
        "false",
        "--report_to",
        "none",
        "--max_eval_samples",
        "64",
    ]
    port, procs = 29000 + os.getpid() % 1000, []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.join(common.ROOT, "train_ddp.py"), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    history = os.path.join(out, "training_history.json")
    while True:
        try:
            logged = [h["step"] for h in json.load(open(history)) if "loss" in h]
        except (OSError, ValueError):
            logged = []
        if logged and logged[-1] >= steps_before_signal:
            break
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a rank ended before the signal:\n" + procs[0].stderr.read()[-2000:])
        time.sleep(0.05)
    t0 = time.perf_counter()
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    seconds = time.perf_counter() - t0
    saved = sorted(os.listdir(os.path.join(out, "checkpoints")))
    print(
        f"SIGTERM          2 CPU ranks (gloo, 1 thread each), MiniLM, WikiText-2, seq 128, batch 8 per rank; "
        f"SIGTERM to rank 1 after step {logged[-1]} was logged\n"
        f"  to exit        {seconds:.2f} s until both ranks had exited (exit codes {codes}); checkpoint {saved}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps_before_signal", type=int, default=3)
    a = ap.parse_args()
    common.quiet_transformers()
    import torch

    print(
        f"== never losing work: checkpoint cost and SIGTERM-to-exit ==\n"
        f"machine          {common.machine()}; torch threads {torch.get_num_threads()}\n"
        f"versions         {common.versions()}",
        flush=True,
    )
    bench_save(a.repeats)
    with tempfile.TemporaryDirectory() as out:
        bench_sigterm(a.steps_before_signal, os.path.join(out, "run"))


if __name__ == "__main__":
    main()
