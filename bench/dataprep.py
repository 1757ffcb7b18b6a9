"""Data preparation at scale: seconds, MB/s and peak RSS as the corpus grows, ours against run_mlm's pipeline.

    python bench/dataprep.py [--sizes 10,100,400,1500] [--threads 1,2] [--work DIR]

Each corpus is WikiText-2 train repeated to about SIZE MB (one .txt file). For each size and thread count:
  ours  load_token_streams into a fresh cache directory: the cached path's preparation as a training run does it
        (texts read in batches, tokenised, written to the cache as they come), with a 5% held-out validation
        split as run_mlm's default; where the time went: reading (its own thread), tokenising, writing.
  HF    run_mlm's default preprocessing: datasets.load_dataset("text") -> map(tokenize, batched) ->
        map(group_texts, batched), caching on, in a fresh cache directory.
Every measurement is a fresh process (peak RSS is the process's, from getrusage, and "baseline" is its RSS once
the tokenizer is loaded). Threads: RAYON_NUM_THREADS (the fast tokenizer's pool) for both. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import chain

import common  # noqa: F401  (offline environment, repo on sys.path)

HERE = os.path.abspath(__file__)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(path: str, megabytes: int, source: str) -> int:
    """source's text repeated until the file holds about `megabytes` MB; its size in bytes."""
    with open(source, "rb") as fh:
        text = fh.read()
    target = megabytes * 1_000_000
    with open(path, "wb") as out:
        written = 0
        while written < target:
            piece = text[: target - written]
            cut = piece.rfind(b"\n") + 1 or len(piece)
            out.write(piece[:cut])
            written += cut
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- one measurement
def measure_ours(path: str, cache: str, tokenizer) -> dict:
    from mlm.config import TrainConfig
    from mlm.data import cached, sources

    spent = {"read": 0.0, "tokenise": 0.0, "write": 0.0}
    original_iter, original_append = sources.iter_text_file, cached._PartWriter.append

    def timed_iter(*args, **kwargs):  # runs in the reader thread: time to produce each batch
        it = original_iter(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                spent["read"] += time.perf_counter() - t0
                return
            spent["read"] += time.perf_counter() - t0
            yield batch

    def timed_append(self, stream):
        t0 = time.perf_counter()
        original_append(self, stream)
        spent["write"] += time.perf_counter() - t0

    def builder(tok, texts):
        t0 = time.perf_counter()
        out = cached.tokenize_texts(tok, texts)
        spent["tokenise"] += time.perf_counter() - t0
        return out

    sources.iter_text_file, cached._PartWriter.append = timed_iter, timed_append
    cfg = TrainConfig(model_name_or_path=common.minilm_path(), train_file=[path], validation_split_percentage=5)
    t0 = time.perf_counter()
    streams, hit, _ = cached.load_token_streams(cfg, tokenizer, cache, builder=builder)
    seconds = time.perf_counter() - t0
    assert not hit
    return {"seconds": seconds, "tokens": int(sum(s.tokens.size for s in streams.values())), **spent}


def measure_hf(path: str, cache: str, tokenizer, seq: int = 128) -> dict:
    import datasets

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // seq) * seq
        return {k: [t[i : i + seq] for i in range(0, total, seq)] for k, t in joined.items()}

    t0 = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": path}, cache_dir=cache)
    raw["validation"] = datasets.load_dataset("text", data_files={"train": path}, split="train[:5%]", cache_dir=cache)
    raw["train"] = datasets.load_dataset("text", data_files={"train": path}, split="train[5%:]", cache_dir=cache)
    tokenised = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    grouped = tokenised.map(group_texts, batched=True)
    return {"seconds": time.perf_counter() - t0, "examples": len(grouped["train"])}


def one(kind: str, path: str, cache: str) -> None:
    common.quiet_transformers()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    baseline = rss_mb()
    out = measure_ours(path, cache, tokenizer) if kind == "ours" else measure_hf(path, cache, tokenizer)
    print(json.dumps({**out, "baseline_mb": baseline, "peak_mb": peak_rss_mb()}))


def run_one(kind: str, path: str, cache: str, threads: int) -> dict:
    env = {
        **os.environ,
        "RAYON_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "true",
        "OMP_NUM_THREADS": str(threads),
    }
    p = subprocess.run(
        [sys.executable, HERE, "--one", kind, "--file", path, "--cache", cache], env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed on {path}:\n{p.stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the table
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,400,1500", help="corpus sizes in MB")
    p.add_argument("--threads", default="1,2", help="tokenizer threads to run each size with")
    p.add_argument("--work", default=None, help="where corpora and caches go (default: a temporary directory)")
    p.add_argument("--dataset_dir", default=common.WIKITEXT)
    p.add_argument("--one", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(a.one, a.file, a.cache)
    work = a.work or tempfile.mkdtemp(prefix="bench-dataprep-")
    os.makedirs(work, exist_ok=True)
    rows = []
    print(f"machine   {common.machine()}\nversions  {common.versions()}\n", flush=True)
    try:
        for size in (int(s) for s in a.sizes.split(",")):
            corpus = os.path.join(work, f"corpus-{size}mb.txt")
            nbytes = make_corpus(corpus, size, os.path.join(a.dataset_dir, "wiki.train.raw"))
            for threads in (int(t) for t in a.threads.split(",")):
                ours = run_one("ours", corpus, os.path.join(work, "ours-cache"), threads)
                hf = run_one("hf", corpus, os.path.join(work, "hf-cache"), threads)
                row = {"mb": nbytes / 1e6, "threads": threads, "ours": ours, "hf": hf}
                rows.append(row)
                print(json.dumps(row), flush=True)
            os.remove(corpus)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| corpus | threads | ours s | ours MB/s | ours peak RSS (baseline) | HF s | HF MB/s | HF peak RSS "
        "(baseline) | MB/s ours / HF | ours: read / tokenise / write s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        o, h, mb = r["ours"], r["hf"], r["mb"]
        print(
            f"| {mb:,.0f} MB | {r['threads']} | {o['seconds']:.1f} | {mb / o['seconds']:.2f} | "
            f"{o['peak_mb'] / 1024:.2f} GB ({o['baseline_mb'] / 1024:.2f}) | {h['seconds']:.1f} | "
            f"{mb / h['seconds']:.2f} | {h['peak_mb'] / 1024:.2f} GB ({h['baseline_mb'] / 1024:.2f}) | "
            f"{h['seconds'] / o['seconds']:.2f}x | {o['read']:.1f} / {o['tokenise']:.1f} / {o['write']:.1f} |"
        )


if __name__ == "__main__":
    main()
