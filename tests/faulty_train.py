"""train_ddp.py with faults injected, for the resilience tests: `torchrun ... tests/faulty_train.py [options]`.

MLM_FAULT (JSON) says what goes wrong, where and when; only the tests set it, and nothing of it lives in the
product's code. Steps count this process's optimizer steps, so on a fresh run they are the global step.
  {"kind": "sigkill" | "sigterm" | "raise", "rank": R, "step": S}   after step S on rank R
  {"kind": "nan", "rank": R, "step": S}        rank R's loss is NaN from step S on ("until": U: to step U only,
                                               an overflow that passes)
  {"kind": "save_crash", "rank": 0, "step": S}  SIGKILL in the middle of writing checkpoint step-S
  "attempt": A   only in torchrun's attempt A (default 0; a restarted group runs clean)
  "sleep": T     sleep T seconds after every step, on every rank (so a test can act mid-run)
  "marker": P    append "<kind> <rank> <time>" to file P when the fault fires
  "record": P    append one JSON line per training micro-batch to P.rank<R>: the epoch, each example's index
                 and a hash of its tokens (kind may be absent: record only)
  "error": "nccl_shm"  with kind "raise": raise the DistBackendError NCCL gives when /dev/shm is too small
  "fake_cuda": {"count": N, "capability": [7, 5], "name": "Tesla T4"}  torch.cuda reports N such GPUs
  "compile_backend": B   torch.compile uses backend B (e.g. aot_eager: graph capture without code generation)
  "prep_sleep": T   building the tokenised cache takes T seconds longer (a long preparation)
  "prep_batch_sleep": T   the cache is built from batches of 20 texts, each T seconds longer (a long preparation
                 that can be stopped between batches)
"""

import hashlib
import json
import os
import signal
import sys
import time

import torch

import train_ddp  # found through PYTHONPATH, which the tests set (helpers._env)
from mlm.data import cached  # noqa: E402
from mlm.model import modeling  # noqa: E402
from mlm.train import checkpoint, loop  # noqa: E402


def install(fault: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    armed = rank == fault.get("rank", rank) and attempt == fault.get("attempt", 0)
    kind, at = fault.get("kind"), fault.get("step", 0)
    steps = {"done": 0}

    def fire() -> None:
        if fault.get("marker"):
            with open(fault["marker"], "a") as fh:
                fh.write(f"{kind} {rank} {time.time()}\n")

    if fault.get("record"):
        original_prepare = loop.prepare_batch

        def prepare_batch(raw, epoch, *args, **kwargs):
            rows = raw["input_ids"].numpy()
            with open(f"{fault['record']}.rank{rank}", "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "epoch": epoch,
                            "index": raw["index"].tolist(),
                            "hash": [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in rows],
                        }
                    )
                    + "\n"
                )
            return original_prepare(raw, epoch, *args, **kwargs)

        loop.prepare_batch = prepare_batch

    if fault.get("prep_sleep"):
        original_build = cached._build_cache

        def build_cache(*args, **kwargs):
            time.sleep(fault["prep_sleep"])
            return original_build(*args, **kwargs)

        cached._build_cache = build_cache

    if fault.get("prep_batch_sleep"):
        from mlm.data import sources

        sources.TEXT_BATCH_ROWS = 20
        original_append = cached._PartWriter.append

        def append(self, *args, **kwargs):
            time.sleep(fault["prep_batch_sleep"])
            return original_append(self, *args, **kwargs)

        cached._PartWriter.append = append

    if fault.get("fake_cuda"):
        fake = fault["fake_cuda"]
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: fake.get("count", 1)
        torch.cuda.get_device_capability = lambda device=None: tuple(fake.get("capability", (7, 5)))
        torch.cuda.get_device_name = lambda device=None: fake.get("name", "Tesla T4")

    if fault.get("compile_backend"):
        real_compile = torch.compile
        torch.compile = lambda module, **kwargs: real_compile(module, **{**kwargs, "backend": fault["compile_backend"]})

    original_step = loop.train_step

    def train_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        steps["done"] += 1
        if fault.get("sleep"):
            time.sleep(fault["sleep"])
        if armed and steps["done"] == at:
            if kind in ("sigkill", "sigterm"):
                fire()
                os.kill(os.getpid(), signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
            elif kind == "raise":
                fire()
                if fault.get("error") == "nccl_shm":
                    raise torch.distributed.DistBackendError(
                        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG=INFO "
                        "for details), NCCL version 2.21.5\nncclSystemError: System call (e.g. socket, malloc) or "
                        "external library call failed or device error.\nLast error:\nError while creating shared "
                        "memory segment /dev/shm/nccl-vzIpS6 (size 9637888)"
                    )
                raise RuntimeError(f"injected failure on rank {rank} at step {at}")
        return result

    loop.train_step = train_step

    if armed and kind == "nan":
        original_forward = modeling.MaskedLMLoss.forward

        def forward(self, *args, **kwargs):
            nll = original_forward(self, *args, **kwargs)
            if at <= steps["done"] + 1 <= fault.get("until", 10**9):  # the step being computed is done + 1
                if steps["done"] + 1 == at:
                    fire()
                return nll * float("nan")
            return nll

        modeling.MaskedLMLoss.forward = forward

    if armed and kind == "save_crash":
        original_torch_save = torch.save

        def save(obj, path, *args, **kwargs):
            original_torch_save(obj, path, *args, **kwargs)
            if f".tmp-step-{at}" in str(path) and str(path).endswith("scheduler.pt"):
                fire()  # weights and optimizer written, the rest and the manifest not: a torn checkpoint
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.torch.save = save


if __name__ == "__main__":
    install(json.loads(os.environ.get("MLM_FAULT", "{}")))
    sys.exit(train_ddp.main())
