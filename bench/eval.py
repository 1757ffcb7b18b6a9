"""Evaluation pass: mlm.train.engine.evaluate vs Trainer.evaluate on the same examples with the same masks.

    python bench/eval.py [--max_eval_samples 512 --repeats 3]     # --max_eval_samples 0: the whole split

The WikiText-2 validation split as 128-token chunks; our masks (mask_tokens at EVAL_EPOCH) are computed once and
given to the Trainer as a pre-masked dataset with labels, so both sides score exactly the same predictions. One
model object serves both sides (same weights, including the freshly initialised MLM head). Eval batch 64,
fp32, CPU, world size 1. Runs alternate ours/HF; medians of --repeats. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # noqa: F401  (offline environment, repo on sys.path)
import torch
from torch.utils.data import DataLoader, Dataset

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import ChunkDataset, eval_shard, tokenize_texts
from mlm.data.masking import EVAL_EPOCH, IGNORE_INDEX, MaskingSpec, build_masking_tables, mask_tokens
from mlm.data.sources import read_text_file
from mlm.model.modeling import MaskedLMLoss, build_model, load_model_config, masked_positions
from mlm.train.engine import Masking, evaluate

CPU = torch.device("cpu")


class PreMasked(Dataset):
    """Masked input ids and labels, one example per item: what the Trainer gets."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def stack(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_eval_samples", type=int, default=512, help="first N validation chunks; 0 = all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--validation_file", default=os.path.join(common.WIKITEXT, "wiki.valid.raw"))
    a = p.parse_args()
    common.quiet_transformers()
    torch.set_num_threads(os.cpu_count())  # the same for both sides
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    cfg = TrainConfig(
        model_name_or_path=common.minilm_path(),
        max_seq_length=a.seq,
        precision="fp32",
        attn_implementation="sdpa",
        per_device_eval_batch_size=a.batch_size,
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    stream = tokenize_texts(tokenizer, read_text_file(a.validation_file))
    valid = ChunkDataset(
        stream, a.seq, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id, limit=a.max_eval_samples or None
    )
    full = stream.tokens.size // (a.seq - 2)
    model = build_model(cfg, load_model_config(cfg), tokenizer)  # seeded: the MLM head is fresh
    loss_module = MaskedLMLoss(model)

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
    masking = Masking(MaskingSpec(cfg.mlm_probability, seed=cfg.seed), build_masking_tables(tokenizer))
    loader = DataLoader(
        valid, batch_size=a.batch_size, sampler=eval_shard(len(valid), 0, 1), collate_fn=lambda b: b
    )  # as build_data builds the eval loader
    raw = valid.__getitems__(list(range(len(valid))))
    masked, labels = mask_tokens(raw["input_ids"], raw["index"], EVAL_EPOCH, masking.spec, masking.tables)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_eval_batch_size=a.batch_size,
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            prediction_loss_only=True,
            disable_tqdm=True,
            seed=cfg.seed,
        )
        trainer = Trainer(model=model, args=args, data_collator=stack, eval_dataset=PreMasked(masked, labels))
        trainer.remove_callback(PrinterCallback)  # its metrics dict would interleave with ours
        with torch.no_grad():  # untimed warm-up of both paths' kernels, so neither side's first run pays it
            model.eval()(input_ids=masked[: a.batch_size], labels=labels[: a.batch_size])
            loss_module.eval_nll(masked[: a.batch_size], *masked_positions(labels[: a.batch_size]))
        ours_s, hf_s, ours_m, hf_m = [], [], {}, {}
        for r in range(a.repeats):
            t0 = time.perf_counter()
            ours_m = evaluate(loss_module, loader, env, masking, "fp32")
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_m = trainer.evaluate()
            hf_s.append(time.perf_counter() - t0)
            print(f"run {r + 1}  ours {ours_s[-1]:.2f}s  HF {hf_s[-1]:.2f}s", flush=True)

    # Trainer's eval_loss is the example-weighted mean of per-batch mean losses; ours is total NLL / total
    # masked tokens. Recompute the Trainer's average from our masks and per-batch losses to compare exactly.
    n_masked = int((labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        per_batch = []
        for i in range(0, len(valid), a.batch_size):
            nll, _ = loss_module.eval_nll(masked[i : i + a.batch_size], *masked_positions(labels[i : i + a.batch_size]))
            rows = min(a.batch_size, len(valid) - i)
            per_batch.append((float(nll) / int((labels[i : i + a.batch_size] != IGNORE_INDEX).sum()), rows))
    ours_batch_mean = sum(loss * n for loss, n in per_batch) / len(valid)
    mo, mh = common.median(ours_s), common.median(hf_s)
    print(
        f"\n== evaluation pass: mlm.train.engine.evaluate vs Trainer.evaluate ==\n"
        f"machine        {common.machine()}; torch threads {torch.get_num_threads()}\n"
        f"versions       {common.versions()}\n"
        f"model          {cfg.model_name_or_path} (AutoModelForMaskedLM, attn_implementation='sdpa', one model "
        f"object for both sides)\n"
        f"data           {a.validation_file}: {len(valid)} of {full} chunks of {a.seq} tokens "
        f"(--max_eval_samples {a.max_eval_samples or 'all'}); {n_masked} masked tokens, masks of mask_tokens "
        f"at EVAL_EPOCH\n"
        f"config         eval batch {a.batch_size}, fp32, CPU, world size 1, Trainer prediction_loss_only=True\n"
        f"measurement    {a.repeats} runs per side, alternated ours/HF; wall time of evaluate() / "
        f"trainer.evaluate()\n"
        f"ours seconds   {common.fmt_runs(ours_s, 's')}  ({len(valid) / mo:.1f} examples/s; head at masked "
        f"positions only, masking done on the fly)\n"
        f"HF   seconds   {common.fmt_runs(hf_s, 's')}  ({len(valid) / mh:.1f} examples/s; head at all positions, "
        f"pre-masked data)\n"
        f"ratio          HF/ours {mh / mo:.2f}x of the medians (ours is that many times faster); "
        f"{min(hf_s) / min(ours_s):.2f}x of the best runs\n"
        f"loss ours      {ours_m['loss']:.6f} = total NLL / total masked tokens (perplexity "
        f"{ours_m['perplexity']:.2f}, accuracy {ours_m['accuracy']:.4f}, {ours_m['masked_tokens']} tokens)\n"
        f"loss HF        {hf_m['eval_loss']:.6f} = mean of per-batch means, weighted by examples\n"
        f"               our per-batch losses averaged the Trainer's way: {ours_batch_mean:.6f} "
        f"(|diff| to HF {abs(ours_batch_mean - hf_m['eval_loss']):.2e}); token-weighted vs batch-weighted "
        f"differ by {abs(ours_m['loss'] - hf_m['eval_loss']):.2e}\n"
        f"note           a shared 2-core machine: other jobs (tests) may have run meanwhile; figures are noisy"
    )


if __name__ == "__main__":
    main()
