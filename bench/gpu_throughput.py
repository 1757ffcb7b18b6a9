"""GPU throughput: our training step vs the Hugging Face Trainer, and predict.py vs pipeline("fill-mask").

    python bench/gpu_throughput.py --assets DIR --out DIR [--budget_s 200] [--steps 20] [--repeats 2]

Model: the bert-base-uncased architecture built from its config (BertConfig(): 12 layers, hidden 768, vocabulary
30522), random weights (no Hub), the same seed on both sides, sdpa attention; two rows of the same kind for the
deberta-v3-base (vocabulary 128100, eager attention: DeBERTa has no SDPA kernel) and ModernBERT-base (22 layers,
vocabulary 50368) architectures, their token ids from the same WordPiece data (all below 30522). MFU uses the
BERT-like FLOP formula for all three (ModernBERT's GeGLU and DeBERTa's relative attention add work it omits).
Data: WikiText-2 train cut into
chunks of the sequence length, the same chunks on both sides, with the bert-base-uncased WordPiece tokenizer.
Rows, in order of priority (a row that would not fit in what is left of --budget_s is printed as not run):
bert-base at sequence 128 x batch 256 and at the largest batch of ours that fits (powers of two from 256, found
with one eager step each), in the card's precision (bf16 from compute capability 8.0), eager and compiled; then
fill-mask; then deberta-v3-base and modernbert-base likewise; then all of it in fp16 + GradScaler. Each row
alternates ours, HF, ours, HF (--repeats per side), each run a fresh model timed over --steps optimizer steps after
--warmup (compilation happens in the warm-up), then 3 steps of ours under torch.profiler: busy/wall (the summed
kernel time over the step's wall time) and kernels per step. Where the Trainer's full-vocabulary logits do not
fit at ours' largest batch, its cell says so.
  ours: the step train_ddp.py runs: host masking (prepare_batch) + train_step (autocast, GradScaler for fp16, the
        head at the masked positions only, fused AdamW, clipping, the on-device schedule), --torch_compile
        compiling the whole fixed-shape step with --compile_mode (reduce-overhead: captured as CUDA graphs);
        loader batches as build_data makes them.
  HF:   Trainer + DataCollatorForLanguageModeling(mlm_probability=0.15), optim adamw_torch_fused, bf16/fp16,
        torch_compile for the compiled rows; timed by a callback that synchronises at the two marks only.
MFU: the model FLOPs a step needs (encoder and attention on every token, the head at the 15% masked positions:
mlm.report.metrics.mlm_step_flops, the same figure for both sides) / seconds / the data-sheet dense peak of the card.
Then fill-mask: predict.py's Predictor (FillMask, batch 32) vs the pipeline one sentence at a time and batched,
on 256 single-mask WikiText-2 test sentences, on the GPU. Prints a markdown table, writes it to OUT/gpu_table.md
(and OUT/gpu_table.json). Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch
from torch.utils.data import DataLoader

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import ChunkDataset, GlobalOrderSampler, tokenize_texts
from mlm.data.sources import read_text_file
from mlm.report.metrics import MlmShape, device_peak, mlm_step_flops
from mlm.train.engine import build_masking, build_trainable, prepare_batch, train_step

DEVICE = torch.device("cuda", 0)
DRY_RUN = {"on": False}  # --dry_run: the whole script on a CPU with a tiny BERT, to check it before GPU time


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


ARCHS = ("bert-base", "deberta-v3-base", "modernbert-base")


MAX_BATCH = 0  # a Row's batch: the largest per-device batch of ours that fits on the card (largest_batch)
COMPILE_MODE = {"mode": "reduce-overhead"}  # ours compiled: whole step fixed-shape, captured as CUDA graphs


@dataclass(frozen=True)
class Row:
    seq: int
    batch: int
    precision: str
    compile: bool
    arch: str = "bert-base"

    @property
    def label(self) -> str:
        batch = "largest batch" if self.batch == MAX_BATCH else str(self.batch)
        return (
            f"{'' if self.arch == 'bert-base' else self.arch + ', '}{self.seq} x {batch}, {self.precision}"
            f"{' + GradScaler' if self.precision == 'fp16' else ''}{', compiled' if self.compile else ''}"
        )


def arch_config(arch: str = "bert-base"):
    """The architecture of bert-base-uncased (BertConfig's defaults), microsoft/deberta-v3-base (its config.json's
    values) or answerdotai/ModernBERT-base (ModernBertConfig's defaults); a tiny one of each in a dry run."""
    from transformers import BertConfig, DebertaV2Config, ModernBertConfig

    tiny = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if DRY_RUN["on"] else {}
    )
    if arch == "deberta-v3-base":
        return DebertaV2Config(
            **{
                **dict(
                    vocab_size=128100,
                    hidden_size=768,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    intermediate_size=3072,
                    max_position_embeddings=512,
                    relative_attention=True,
                    position_buckets=256,
                    norm_rel_ebd="layer_norm",
                    share_att_key=True,
                    pos_att_type=["p2c", "c2p"],
                    layer_norm_eps=1e-7,
                    position_biased_input=False,
                    type_vocab_size=0,
                ),
                **tiny,
            }
        )
    if arch == "modernbert-base":
        return ModernBertConfig(**tiny)
    return BertConfig(**tiny)


def bert_config():
    return arch_config("bert-base")


def bert_base(arch: str = "bert-base"):
    """The model from its config, random weights, fp32 masters (the same on both sides); transformers' own
    attention choice (SDPA, or eager for DeBERTa, which has no SDPA kernel)."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(arch_config(arch), dtype=torch.float32)


def kernel_times(prof) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(device seconds, kernel count, [(name, seconds, count)] by time) of the profiled kernels."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((e.key, t / 1e6, e.count))
    rows.sort(key=lambda r: -r[1])
    return sum(r[1] for r in rows), sum(r[2] for r in rows), rows


def run_ours(row: Row, chunks: ChunkDataset, tokenizer, warmup: int, steps: int, batch: int) -> dict:
    """Seconds of `steps` optimizer steps after `warmup`; then 3 steps under torch.profiler: the GPU's busy
    seconds per step and kernels per step."""
    cfg = TrainConfig(
        learning_rate=5e-5,
        num_warmup_steps=0,
        per_device_train_batch_size=batch,
        torch_compile=row.compile,
        torch_compile_mode=COMPILE_MODE["mode"] if row.compile else "default",
    )
    trainable = build_trainable(cfg, bert_base(row.arch).to(DEVICE), row.precision, DEVICE, warmup + steps + 3)
    trainable.loss.train()
    masking = build_masking(cfg, tokenizer)
    sampler = GlobalOrderSampler(chunks, 1, 0, cfg.seed)
    loader = DataLoader(chunks, batch_size=batch, sampler=sampler, collate_fn=lambda b: b, drop_last=True)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=DEVICE)
    timed = _timed_steps(trainable, masking, _cycle(loader), env, warmup, steps)
    del trainable  # before empty_cache: the model and its optimizer state go
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return timed


def _timed_steps(trainable, masking, raws, env: DistEnv, warmup: int, steps: int) -> dict:
    return time_and_profile(
        lambda i: train_step(trainable, [prepare_batch(next(raws), 0, masking, DEVICE)], env), warmup, steps
    )


def time_and_profile(step: Callable[[int], None], warmup: int, steps: int, profiled: int = 3) -> dict:
    """step(i) for i in order: `steps` of them timed after `warmup`, then `profiled` more under torch.profiler.
    Returns the timed seconds, and the device's busy seconds and kernels per profiled step (0 on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    seconds = time.perf_counter() - t0
    with profile(activities=activities) as prof:
        for i in range(warmup + steps, warmup + steps + profiled):
            step(i)
        sync()
    busy, kernels, _ = kernel_times(prof) if DEVICE.type == "cuda" else (0.0, 0, [])
    return {"seconds": seconds, "busy_per_step": busy / profiled, "kernels_per_step": kernels / profiled}


def _cycle(loader):
    while True:
        yield from loader


def largest_batch(row: Row, chunks: ChunkDataset, tokenizer) -> int:
    """The largest per-device batch (a power of two from 256) whose eager step of ours fits in the card's memory;
    a compiled step needs no more."""
    candidates = (4, 8) if DRY_RUN["on"] else (256, 512, 1024, 2048, 4096)
    fits = candidates[0]
    eager = Row(row.seq, candidates[0], row.precision, False, row.arch)
    for batch in candidates:
        if batch > len(chunks):
            break
        try:
            run_ours(eager, chunks, tokenizer, 1, 1, batch)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        fits = batch
    return fits


class Rows(torch.utils.data.Dataset):
    """What run_mlm hands the Trainer: the same chunks as ours, with their special-tokens mask."""

    def __init__(self, chunks: ChunkDataset):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        ids = self.chunks[i]["input_ids"]
        special = torch.zeros_like(ids)
        special[0] = special[-1] = 1
        return {"input_ids": ids, "special_tokens_mask": special}


def run_hf(row: Row, chunks: ChunkDataset, tokenizer, warmup: int, steps: int, batch: int) -> float:
    from transformers import (
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    marks: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                sync()
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            learning_rate=5e-5,
            weight_decay=0.01,
            max_grad_norm=1.0,
            lr_scheduler_type="linear",
            report_to="none",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=42,
            optim="adamw_torch_fused",
            bf16=row.precision == "bf16",
            fp16=row.precision == "fp16",
            torch_compile=row.compile,
            dataloader_num_workers=0,
            use_cpu=DEVICE.type == "cpu",
        )
        trainer = Trainer(
            model=bert_base(row.arch),
            args=args,
            train_dataset=Rows(chunks),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
            callbacks=[StepClock()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return marks[warmup + steps] - marks[warmup]


def bench_predict(tokenizer_dir: str, test_file: str, n: int = 256, repeats: int = 3) -> dict:
    """predict.py's path vs the pipeline on the GPU: sentences/s and top-1 agreement."""
    from transformers import AutoTokenizer, pipeline

    with tempfile.TemporaryDirectory() as model_dir:
        bert_base().save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
        cli = common.load_cli()
        predictor = cli.Predictor(cli.build_parser().parse_args(["--model", model_dir, "--device", DEVICE.type]))
        pipe = pipeline("fill-mask", model=model_dir, device=DEVICE)
        texts = common.wikitext_sentences(test_file, n, pipe.tokenizer.get_vocab())
        sides = {
            "ours": lambda: (lambda p: (cli.emit(p, False, io.StringIO()), p)[1])(predictor(texts)),
            "hf_one_by_one": lambda: [pipe(t) for t in texts],
            "hf_batched": lambda: pipe(texts, batch_size=32),
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        results = {k: fn() for k, fn in sides.items()}  # warm-up
        for _ in range(repeats):
            for k, fn in sides.items():
                sync()
                t0 = time.perf_counter()
                results[k] = fn()
                sync()
                times[k].append(time.perf_counter() - t0)
    agree = sum(
        p.masks[0].candidates[0].token_id == h[0]["token"] for p, h in zip(results["ours"], results["hf_one_by_one"])
    )
    rates = {k: len(texts) / common.median(v) for k, v in times.items()}
    return {"sentences": len(texts), "sentences_per_s": rates, "top1_agree": agree}


def load_chunks(tokenizer, wikitext: str, seq: int) -> ChunkDataset:
    stream = tokenize_texts(tokenizer, read_text_file(os.path.join(wikitext, "wiki.train.raw")))
    return ChunkDataset(stream, seq, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)


PREDICT = "fill-mask"


def plan(native_bf16: bool) -> list:
    """The rows in order of priority (the budget cuts from the end): bert-base at 128 x 256 and at the largest
    batch that fits, in the card's precision, eager and compiled (the MFU goal's rows); fill-mask; then
    deberta-v3-base and modernbert-base likewise; then fp16 + GradScaler (what T4s run) for each."""
    first, second = ("bf16", "fp16") if native_bf16 else ("fp16", None)
    order = []
    for arch in ARCHS:
        for batch in (256, MAX_BATCH):
            order += [(128, batch, first, False, arch), (128, batch, first, True, arch)]
        if arch == "bert-base":
            order.append(PREDICT)
    for arch in ARCHS:
        for batch in (256, MAX_BATCH):
            order += [(128, batch, second, False, arch), (128, batch, second, True, arch)]
    if DRY_RUN["on"]:
        order = [
            (128, 8, "bf16", False),
            (128, 8, "bf16", True),
            (128, MAX_BATCH, "bf16", False),
            (128, 8, "bf16", False, "deberta-v3-base"),
            (128, 8, "bf16", True, "modernbert-base"),
            PREDICT,
        ]
    return [item if item == PREDICT else Row(*item) for item in order if item == PREDICT or item[2] is not None]


def table(results: list[dict], peak: float, peak_source: str, predict: dict | None, header: str) -> str:
    lines = [
        header,
        "",
        f"MFU against {peak / 1e12:.0f} TFLOP/s ({peak_source}).",
        "",
        "| row | batch | ours samples/s | HF Trainer samples/s | ours / HF | ours MFU | HF MFU | ours busy/wall |"
        " ours kernels/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | | not run: {r['skipped']} | | | | | | |")
            continue
        hf = (
            (f"{r['hf']:.1f} ({', '.join(f'{x:.1f}' for x in r['hf_runs'])})", f"{r['ours'] / r['hf']:.2f}x")
            if r["hf"]
            else ("out of memory", "HF cannot")
        )
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['ours']:.1f} ({', '.join(f'{x:.1f}' for x in r['ours_runs'])}) | "
            f"{hf[0]} | {hf[1]} | {r['ours_mfu']:.3f} | {r['hf_mfu']:.3f} | {r['busy_wall']:.2f} | "
            f"{r['kernels']:.0f} |"
        )
    if not predict:
        lines += ["", "Fill-mask: not run (time budget)."]
    else:
        s = predict["sentences_per_s"]
        lines += [
            "",
            f"Fill-mask, {predict['sentences']} single-mask WikiText-2 test sentences on the GPU: ours "
            f"(predict.py's Predictor, batch 32) {s['ours']:.1f} sentences/s; pipeline one by one "
            f"{s['hf_one_by_one']:.1f} ({s['ours'] / s['hf_one_by_one']:.2f}x); pipeline batched (32) "
            f"{s['hf_batched']:.1f} ({s['ours'] / s['hf_batched']:.2f}x); top-1 token equal in "
            f"{predict['top1_agree']}/{predict['sentences']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--assets",
        default=os.environ.get("MLM_GPU_ASSETS", ".gpu-assets"),
        help="tokenizer/ and wikitext-2-raw-v1/ (bench/gpu_prepare.sh fills it)",
    )
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--budget_s", type=float, default=200.0, help="seconds for the whole table")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--compile_mode",
        default="reduce-overhead",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="ours compiled: --torch_compile_mode (reduce-overhead captures the step as CUDA graphs)",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="on the CPU with a tiny BERT, bf16 rows only, 2 steps: checks the script, measures nothing",
    )
    a = p.parse_args()
    COMPILE_MODE["mode"] = a.compile_mode
    if a.dry_run:
        global DEVICE
        DEVICE, DRY_RUN["on"] = torch.device("cpu"), True
        a.warmup, a.steps, a.repeats = 1, 2, 1
    t_start = time.perf_counter()
    common.quiet_transformers()
    from transformers import AutoTokenizer

    os.makedirs(a.out, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(a.assets, "tokenizer"))
    wikitext = os.path.join(a.assets, "wikitext-2-raw-v1")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_ddp.py (--tf32)
    capability = torch.cuda.get_device_capability(0) if DEVICE.type == "cuda" else (8, 0)
    native_bf16 = capability >= (8, 0)
    name = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "CPU (dry run)"
    peak, peak_source = device_peak(DEVICE, "bf16" if native_bf16 else "fp16")
    header = (
        f"GPU throughput, {name} (compute capability {capability[0]}.{capability[1]}); {common.versions()}; "
        f"{'a tiny BERT (dry run)' if DRY_RUN['on'] else 'bert-base architecture'}, random weights; "
        f"{a.warmup} warm-up + {a.steps} timed steps per run, {a.repeats} runs per side alternated "
        "(compiled rows: 1), medians (runs in brackets)"
    )
    chunks: dict[int, ChunkDataset] = {}
    largest: dict[tuple, int] = {}
    results: list[dict] = []
    predict = None
    eager_cost, compiled_cost = 45.0, 130.0  # guesses until a row of the kind has run
    rows = plan(native_bf16)
    for row in rows:
        left = a.budget_s - (time.perf_counter() - t_start)
        if row == PREDICT:
            if left > 30:
                t0 = time.perf_counter()
                predict = bench_predict(os.path.join(a.assets, "tokenizer"), os.path.join(wikitext, "wiki.test.raw"))
                print(f"fill-mask: {json.dumps(predict)} ({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        cost = compiled_cost if row.compile else eager_cost
        if left < cost:
            results.append({"row": row.label, "skipped": f"time budget ({left:.0f} s left, about {cost:.0f} s needed)"})
            print(f"{row.label}: not run ({left:.0f} s left)", flush=True)
            continue
        t0 = time.perf_counter()
        if row.seq not in chunks:
            chunks[row.seq] = load_chunks(tokenizer, wikitext, row.seq)
        batch = row.batch
        if batch == MAX_BATCH:
            key = (row.arch, row.seq, row.precision)
            if key not in largest:
                largest[key] = largest_batch(row, chunks[row.seq], tokenizer)
            batch = largest[key]
        ours, hf, profiles = [], [], []
        for _ in range(1 if row.compile else a.repeats):  # a compiled run costs a compilation on each side
            timed = run_ours(row, chunks[row.seq], tokenizer, a.warmup, a.steps, batch)
            ours.append(a.steps * batch / timed["seconds"])
            profiles.append(timed)
            try:  # the Trainer's full-vocabulary logits may not fit where ours (masked positions only) do
                hf.append(a.steps * batch / run_hf(row, chunks[row.seq], tokenizer, a.warmup, a.steps, batch))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                hf.append(0.0)
            print(f"{row.label} (batch {batch}): ours {ours[-1]:.1f}, HF {hf[-1]:.1f} samples/s", flush=True)
        needed = mlm_step_flops(
            MlmShape.from_config(arch_config(row.arch)),
            row.seq * batch,
            batch * row.seq**2,
            0.15 * (row.seq - 2) * batch,
        )
        mo, mh = common.median(ours), common.median(hf)
        wall = a.steps * batch / mo / a.steps  # seconds per step
        results.append(
            {
                "row": row.label,
                "batch": batch,
                "ours": mo,
                "hf": mh,
                "ours_runs": ours,
                "hf_runs": hf,
                "ours_mfu": needed * mo / batch / peak,
                "hf_mfu": needed * mh / batch / peak,
                "busy_wall": common.median([t["busy_per_step"] for t in profiles]) / wall,
                "kernels": common.median([t["kernels_per_step"] for t in profiles]),
            }
        )
        spent = time.perf_counter() - t0
        if row.compile:
            compiled_cost = max(compiled_cost * 0.5, spent * 1.1)
        else:
            eager_cost = spent * 1.2
    text = table(results, peak, peak_source, predict, header)
    print("\n" + text, flush=True)
    with open(os.path.join(a.out, "gpu_table.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(a.out, "gpu_table.json"), "w") as fh:
        json.dump({"card": name, "peak": peak, "rows": results, "predict": predict}, fh, indent=1)


if __name__ == "__main__":
    main()
