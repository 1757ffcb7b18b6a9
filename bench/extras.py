"""What the optional features cost or give: SWA's per-step update, and ONNX Runtime vs PyTorch for fill-mask.

    python bench/extras.py [--sentences 256 --repeats 3]

1. SWA: MiniLM training step (ours, fp32, batch 16 x 128 tokens, CPU) with and without the AveragedModel update
   after it; the update's share of a step.
2. Fill-mask: FillMask.predict on WikiText-2 test sentences with one mask each, batch 32, PyTorch vs the same
   model exported by mlm.inference.export_onnx and run by onnxruntime (CPU), alternated; top-1 agreement and the largest
   score difference.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import common
import torch

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.inference.fill_mask import FillMask
from mlm.model.modeling import build_model, load_model_config
from mlm.train.engine import build_masking, build_trainable, prepare_batch, train_step
from mlm.train.swa import WeightAverage

CPU = torch.device("cpu")


def swa_cost(steps: int = 8) -> tuple[float, float]:
    from transformers import AutoTokenizer

    cfg = TrainConfig(model_name_or_path=common.minilm_path(), output_dir="/tmp/unused", report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    torch.manual_seed(0)
    model = build_model(cfg, load_model_config(cfg), tokenizer)
    trainable = build_trainable(cfg, model, "fp32", CPU, 100)
    masking = build_masking(cfg, tokenizer)
    swa = WeightAverage(model, start_step=1)
    ids = torch.randint(1000, 30000, (16, 128))
    step_s, update_s = [], []
    for i in range(steps + 2):
        micro = [prepare_batch({"input_ids": ids, "index": torch.arange(16) + 16 * i}, 0, masking, CPU)]
        t0 = time.perf_counter()
        train_step(trainable, micro, DistEnv(0, 0, 1, CPU))
        t1 = time.perf_counter()
        swa.update(model, i + 1)
        t2 = time.perf_counter()
        if i >= 2:
            step_s.append(t1 - t0)
            update_s.append(t2 - t1)
    return common.median(step_s), common.median(update_s)


def sentences(n: int) -> list[str]:
    rng = random.Random(0)
    text = open(os.path.join(common.WIKITEXT, "wiki.test.raw"), encoding="utf-8").read()
    lines = [
        s.strip() + " ."
        for para in text.split("\n")
        if not para.strip().startswith("=")
        for s in para.split(" . ")
        if 12 <= len(s.split()) <= 40
    ]
    out = []
    for line in rng.sample(lines, n):
        words = line.split()
        words[rng.randrange(len(words))] = "[MASK]"
        out.append(" ".join(words))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    common.quiet_transformers()
    print(f"machine: {common.machine()}; {common.versions()}\n")
    step, update = swa_cost()
    print(
        f"1. SWA: MiniLM training step {step * 1e3:.0f} ms, AveragedModel update {update * 1e3:.1f} ms "
        f"({update / step:.1%} of a step)\n"
    )

    from mlm.inference.export_onnx import export

    texts = sentences(args.sentences)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        torch_side = FillMask(common.minilm_path(), device="cpu")
        path = os.path.join(d, "minilm.onnx")
        export(torch_side.model, path)
        onnx_side = FillMask(common.minilm_path(), onnx=path)
        for side in (torch_side, onnx_side):  # warm-up
            side.predict(texts[:32], top_k=5, batch_size=32)
        times = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.repeats):
            for name, side in (("pytorch", torch_side), ("onnxruntime", onnx_side)):
                t0 = time.perf_counter()
                preds = side.predict(texts, top_k=5, batch_size=32)
                times[name].append(time.perf_counter() - t0)
                if name == "pytorch":
                    ref = preds
                else:
                    got = preds
    agree = sum(a.masks[0].candidates[0].token == b.masks[0].candidates[0].token for a, b in zip(ref, got))
    diff = max(
        abs(x.score - y.score) for a, b in zip(ref, got) for x, y in zip(a.masks[0].candidates, b.masks[0].candidates)
    )
    pt, ox = common.median(times["pytorch"]), common.median(times["onnxruntime"])
    print(f"2. fill-mask, {len(texts)} sentences, batch 32, MiniLM, CPU:")
    print(f"   PyTorch      {common.fmt_runs(times['pytorch'], ' s')}  -> {len(texts) / pt:.1f} sentences/s")
    print(f"   onnxruntime  {common.fmt_runs(times['onnxruntime'], ' s')}  -> {len(texts) / ox:.1f} sentences/s")
    print(
        f"   onnxruntime / PyTorch throughput: {pt / ox:.2f}x; top-1 agrees on {agree}/{len(texts)}; "
        f"largest top-5 score difference {diff:.2g}"
    )


if __name__ == "__main__":
    main()
