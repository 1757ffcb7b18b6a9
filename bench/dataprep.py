"""Data preparation: tokenise + chunk WikiText-2 train into 128-token examples, ours vs run_mlm's pipeline.

    python bench/dataprep.py [--repeats 3]

ours cold: read_text_file -> tokenize_texts -> ChunkDataset (no cache involved).
ours warm: load_token_streams hitting a cache built once before + ChunkDataset (the path build_data takes).
HF cold:   datasets.load_dataset("text") -> .map(tokenize, batched) -> .map(group_texts, batched), each run in a
           fresh datasets cache directory. HF warm: the same again in the directory of the last cold run.
Runs alternate ours/HF; medians of --repeats. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from itertools import chain

import common  # noqa: F401  (offline environment, repo on sys.path)

from mlm.config import TrainConfig
from mlm.data import ChunkDataset, load_token_streams, tokenize_texts
from mlm.sources import read_text_file


def ours_cold(tokenizer, path: str, seq: int) -> ChunkDataset:
    stream = tokenize_texts(tokenizer, read_text_file(path))
    return ChunkDataset(stream, seq, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)


def ours_warm(cfg: TrainConfig, tokenizer, cache_dir: str, seq: int) -> tuple[ChunkDataset, bool]:
    streams, hit, _ = load_token_streams(cfg, tokenizer, cache_dir)
    return ChunkDataset(streams["train"], seq, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id), hit


def run_mlm_pipeline(tokenizer, path: str, seq: int, cache_dir: str):
    """run_mlm.py's default (grouped, not line-by-line) preprocessing, written here. Returns (tokenised, grouped)."""
    import datasets

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        # Concatenate every column, drop the remainder that does not fill a whole block, cut into blocks.
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // seq) * seq
        return {k: [t[i:i + seq] for i in range(0, total, seq)] for k, t in joined.items()}

    raw = datasets.load_dataset("text", data_files={"train": path}, cache_dir=cache_dir)
    tokenised = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    grouped = tokenised.map(group_texts, batched=True)
    return tokenised["train"], grouped["train"]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dataset_dir", default=common.WIKITEXT)
    a = p.parse_args()
    common.quiet_transformers()
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    model = common.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    train = os.path.join(a.dataset_dir, "wiki.train.raw")
    cfg = TrainConfig(model_name_or_path=model, dataset_dir=a.dataset_dir, max_seq_length=a.seq)
    work = tempfile.mkdtemp(prefix="bench-dataprep-")
    try:
        ours_cache = os.path.join(work, "mlm-cache")
        build_s, _ = timed(load_token_streams, cfg, tokenizer, ours_cache)  # built once, before any warm run
        cold, warm, hf_cold, hf_warm, hits = [], [], [], [], []
        for r in range(a.repeats):
            t, ours = timed(ours_cold, tokenizer, train, a.seq)
            cold.append(t)
            t, (ours_w, hit) = timed(ours_warm, cfg, tokenizer, ours_cache, a.seq)
            warm.append(t)
            hits.append(hit)
            hf_dir = os.path.join(work, f"hf-cache-{r}")  # fresh: a really cold run
            t, (tokenised, grouped) = timed(run_mlm_pipeline, tokenizer, train, a.seq, hf_dir)
            hf_cold.append(t)
            t, _ = timed(run_mlm_pipeline, tokenizer, train, a.seq, hf_dir)
            hf_warm.append(t)
            print(f"run {r + 1}  ours cold {cold[-1]:.3f}s  ours warm {warm[-1]:.3f}s  "
                  f"HF cold {hf_cold[-1]:.3f}s  HF warm {hf_warm[-1]:.3f}s", flush=True)

        lines = len(read_text_file(train))
        ours_tokens = int(ours_w.bodies.size + ours_w.dropped_tokens)  # the stream, before chunking
        hf_tokens = sum(map(len, tokenised["input_ids"]))
        hf_chunks = len(grouped)
        print(f"\n== data preparation: tokenise + chunk WikiText-2 train ==\n"
              f"machine        {common.machine()}\n"
              f"versions       {common.versions()}\n"
              f"tokenizer      {model} (fast WordPiece, vocab {len(tokenizer)})\n"
              f"data           {train}: {lines} lines; max_seq_length {a.seq}\n"
              f"measurement    {a.repeats} runs per path, alternated; times in seconds, tokenizer already loaded\n"
              f"ours cold      {common.fmt_runs(cold, 's')}   read_text_file + tokenize_texts + ChunkDataset\n"
              f"ours warm      {common.fmt_runs(warm, 's')}   load_token_streams (cache hit: {all(hits)}) + "
              f"ChunkDataset; hashes both WikiText files and the tokenizer, maps both splits\n"
              f"               (the cache was built once by load_token_streams in {build_s:.3f}s: train + "
              f"validation, tokenised and written)\n"
              f"HF cold        {common.fmt_runs(hf_cold, 's')}   load_dataset('text') + map(tokenize) + "
              f"map(group_texts), fresh cache_dir\n"
              f"HF warm        {common.fmt_runs(hf_warm, 's')}   the same, its cache files reused\n"
              f"ratio cold     HF/ours {common.median(hf_cold) / common.median(cold):.2f}x of the medians (ours is "
              f"that many times faster); {min(hf_cold) / min(cold):.2f}x of the best runs\n"
              f"ratio warm     HF/ours {common.median(hf_warm) / common.median(warm):.2f}x of the medians; "
              f"{min(hf_warm) / min(warm):.2f}x of the best runs\n"
              f"tokens         ours {ours_tokens} (no special tokens; [CLS]/[SEP] added per chunk)   "
              f"HF {hf_tokens} ([CLS]/[SEP] per line)\n"
              f"               HF - 2 x {lines} lines = {hf_tokens - 2 * lines}: "
              f"{'the same text tokens as ours' if hf_tokens - 2 * lines == ours_tokens else 'DIFFERS from ours'}\n"
              f"chunks         ours {len(ours)} = {ours_tokens} // {a.seq - 2} (126 text tokens + [CLS] + [SEP] "
              f"each; {ours.dropped_tokens} remainder dropped)\n"
              f"               HF   {hf_chunks} = {hf_tokens} // {a.seq} (128 tokens each, with a [CLS]/[SEP] pair "
              f"per line inside; {hf_tokens % a.seq} dropped)\n"
              f"note           a shared 2-core machine: other jobs (tests) may have run meanwhile; figures are noisy")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
