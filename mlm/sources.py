"""Where the texts come from: a Hub dataset, local files or a WikiText directory, for the cached path (every
split's texts, read whole) and for the streamed one (a split as a datasets IterableDataset).

Both paths name files, splits and datasets the same way, so they live here, below data.py and streaming.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .cli import UserError
from .files import sha256_file
from .hub import failure as hub_failure

if TYPE_CHECKING:
    from .config import TrainConfig

LOCAL_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet", ".csv")
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw"}


def wikitext_file(dataset_dir: str, split: str) -> str:
    return os.path.join(dataset_dir, WIKITEXT_FILES[split])


def hub_label(name: str, config_name: str | None) -> str:
    """How a Hub dataset is named in messages: name/configuration."""
    return f"{name}/{config_name}" if config_name else name


def builder_for(path: str) -> str:
    """The `datasets` packaged builder that reads a local file of this kind."""
    suffix = path.rsplit(".", 1)[-1]
    return {"txt": "text", "raw": "text", "jsonl": "json"}.get(suffix, suffix)


# ---------------------------------------------------------------------- whole splits (the cached path)
@dataclass(frozen=True)
class Source:
    """Where each split's texts come from: a name for messages, a fingerprint, and a loader of texts."""
    description: str
    fingerprint: str
    load: Callable[[], dict[str, list[str]]]


def read_text_file(path: str) -> list[str]:
    """Texts of a local file: a line each for .txt/.raw; the 'text' column for .json/.jsonl/.parquet/.csv."""
    if path.endswith((".txt", ".raw")):
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    import datasets
    kind = builder_for(path)
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise UserError(f"could not read {path!r} as {kind} ({type(e).__name__}); check the file's format") from None
    if "text" not in ds.column_names:
        raise UserError(f"{path!r} has no 'text' column (columns: {', '.join(ds.column_names)}); name the column "
                        "holding the text 'text'")
    return [t or "" for t in ds["text"]]


def carve_validation(texts: list[str], percentage: int, origin: str) -> dict[str, list[str]]:
    """Hold out the first `percentage`% of rows, as run_mlm's train[:N%] / train[N%:] split does."""
    if percentage == 0:
        raise UserError(f"{origin} has no validation split; give --validation_file or a "
                        "--validation_split_percentage above 0")
    n_val = len(texts) * percentage // 100
    return {"train": texts[n_val:], "validation": texts[:n_val]}


def _local_source(cfg: TrainConfig) -> Source:
    if cfg.dataset_dir:
        files = {split: wikitext_file(cfg.dataset_dir, split) for split in WIKITEXT_FILES}
        return Source(f"WikiText directory {cfg.dataset_dir}",
                      "wikitext-dir:" + ",".join(sha256_file(p) for p in files.values()),
                      lambda: {split: read_text_file(p) for split, p in files.items()})
    train, valid = cfg.train_file, cfg.validation_file
    fp = f"files:{sha256_file(train)}:{train.rsplit('.', 1)[-1]}"
    if valid:
        fp += f":{sha256_file(valid)}:{valid.rsplit('.', 1)[-1]}"
        return Source(f"{train} + {valid}", fp, lambda: {"train": read_text_file(train),
                                                        "validation": read_text_file(valid)})
    pct = cfg.validation_split_percentage
    return Source(f"{train} ({pct}% held out)", f"{fp}:holdout{pct}",
                  lambda: carve_validation(read_text_file(train), pct, train))


def _hub_source(cfg: TrainConfig) -> Source:
    import datasets
    label = hub_label(cfg.dataset_name, cfg.dataset_config_name)
    try:
        dd = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
    except Exception as e:
        raise UserError(f"could not load dataset {label!r} ({hub_failure(e)}); check the name and your "
                        "connection, or use local data with --train_file or --dataset_dir") from None
    if "train" not in dd:
        raise UserError(f"dataset {label!r} has no 'train' split (splits: {', '.join(dd)})")
    if "text" not in dd["train"].column_names:
        raise UserError(f"dataset {label!r} has no 'text' column (columns: {', '.join(dd['train'].column_names)})")
    pct = cfg.validation_split_percentage
    fp = f"hub:{label}:" + ",".join(f"{k}={v._fingerprint}" for k, v in sorted(dd.items()))

    def load() -> dict[str, list[str]]:
        if "validation" in dd:
            return {"train": list(dd["train"]["text"]), "validation": list(dd["validation"]["text"])}
        return carve_validation(list(dd["train"]["text"]), pct, label)
    return Source(f"Hub dataset {label}", fp if "validation" in dd else f"{fp}:holdout{pct}", load)


def build_source(cfg: TrainConfig) -> Source:
    return _local_source(cfg) if (cfg.dataset_dir or cfg.train_file) else _hub_source(cfg)


# ---------------------------------------------------------------------- one split as a stream
def _stream_error(label: str, e: Exception) -> UserError:
    return UserError(f"could not stream dataset {label!r} ({hub_failure(e)}); check the name and your "
                     "connection, or stream local files with --train_file/--validation_file or --dataset_dir")


def open_split(cfg: TrainConfig, split: str):
    """One split as a datasets IterableDataset with a 'text' column (and perhaps others)."""
    import datasets
    if cfg.dataset_dir or cfg.train_file:
        if cfg.dataset_dir:
            path = wikitext_file(cfg.dataset_dir, split)
        else:
            path = cfg.train_file if split == "train" else cfg.validation_file
        ds = datasets.load_dataset(builder_for(path), data_files={split: path}, split=split, streaming=True)
        label = path
    else:
        label = hub_label(cfg.dataset_name, cfg.dataset_config_name)
        try:
            ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split, streaming=True)
        except ValueError as e:
            if "split" in str(e).lower():
                raise UserError(f"dataset {label!r} has no {split!r} split; --streaming reads the validation "
                                "split whole, so use a dataset that has one, or local files") from None
            raise _stream_error(label, e) from None
        except Exception as e:
            raise _stream_error(label, e) from None
    if ds.column_names is None:
        ds = ds._resolve_features()  # peeks at the first example: the columns must be known to drop them
    if "text" not in ds.column_names:
        raise UserError(f"{label!r} has no 'text' column (columns: {', '.join(ds.column_names)}); name the "
                        "column holding the text 'text'")
    return ds


def validation_texts(cfg: TrainConfig) -> list[str]:
    """The whole validation split: it is finite, and evaluation must count each example exactly once."""
    return [row["text"] or "" for row in open_split(cfg, "validation")]
