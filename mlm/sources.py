"""Where the texts come from: a Hub dataset, local files or a WikiText directory, for the cached path (every
split's texts, read whole) and for the streamed one (a split as a datasets IterableDataset).

Both paths name files, splits and datasets the same way, so they live here, below data.py and streaming.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from .cleaning import TextReport, clean_values, readable_copy
from .cli import UserError
from .files import sha256_file
from .hub import failure as hub_failure

if TYPE_CHECKING:
    from .config import TrainConfig

LOCAL_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet", ".csv")
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw"}
WIKITEXT_TEST = "wiki.test.raw"  # optional: when present, the final best/ is evaluated on it


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlm-ddp")


def text_copies_dir(cfg: TrainConfig) -> str:
    """Where UTF-8 copies of files with undecodable bytes go (mlm/cleaning.py), beside the tokenised cache."""
    return os.path.join(cfg.data_cache_dir or default_cache_dir(), "text")


def wikitext_file(dataset_dir: str, split: str) -> str:
    return os.path.join(dataset_dir, WIKITEXT_TEST if split == "test" else WIKITEXT_FILES[split])


def test_file(cfg: TrainConfig) -> Optional[str]:
    """The local file of the test split: --test_file, else wiki.test.raw in --dataset_dir when it is there."""
    if cfg.test_file:
        return cfg.test_file
    if cfg.dataset_dir and os.path.isfile(wikitext_file(cfg.dataset_dir, "test")):
        return wikitext_file(cfg.dataset_dir, "test")
    return None


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
    """Where each split's texts come from: a name for messages, a fingerprint, a loader of texts (train and
    validation, and test when the source has one), and what the loader replaced or skipped (--text_errors),
    filled as it loads."""
    description: str
    fingerprint: str
    load: Callable[[], dict[str, list[str]]]
    report: TextReport = field(default_factory=TextReport)


def read_text_file(path: str, text_errors: str = "error", report: Optional[TextReport] = None,
                   clean_dir: Optional[str] = None) -> list[str]:
    """Texts of a local file: a line each for .txt/.raw; the 'text' column for .json/.jsonl/.parquet/.csv.
    Undecodable bytes and non-string values are handled as text_errors says (mlm/cleaning.py)."""
    report = report if report is not None else TextReport()
    readable = path if path.endswith(".parquet") else readable_copy(path, text_errors, report, clean_dir)
    if path.endswith((".txt", ".raw")):
        with open(readable, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        return clean_values(lines[:-1] if lines and lines[-1] == "" else lines, text_errors, path, report)
    import datasets
    kind = builder_for(path)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" for a local file is noise, on every run
    try:
        ds = datasets.load_dataset(kind, data_files=readable, split="train")
    except Exception as e:
        raise UserError(f"could not read {path!r} as {kind} ({type(e).__name__}); check the file's format") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if "text" not in ds.column_names:
        raise UserError(f"{path!r} has no 'text' column (columns: {', '.join(ds.column_names)}); name the column "
                        "holding the text 'text'")
    return clean_values(ds["text"], text_errors, path, report)


def carve_validation(texts: list[str], percentage: int, origin: str) -> dict[str, list[str]]:
    """Hold out the first `percentage`% of rows, as run_mlm's train[:N%] / train[N%:] split does."""
    if percentage == 0:
        raise UserError(f"{origin} has no validation split; give --validation_file or a "
                        "--validation_split_percentage above 0")
    n_val = len(texts) * percentage // 100
    return {"train": texts[n_val:], "validation": texts[:n_val]}


def _mode(cfg: TrainConfig) -> str:
    """The fingerprint's suffix for --text_errors: replace and skip give different texts from the same file (error
    gives texts only from clean files)."""
    return "" if cfg.text_errors == "error" else f":text_errors={cfg.text_errors}"


def _local_source(cfg: TrainConfig) -> Source:
    report = TextReport()
    mode = _mode(cfg)

    def read(path: str) -> list[str]:
        return read_text_file(path, cfg.text_errors, report, text_copies_dir(cfg))
    if cfg.dataset_dir:
        files = {split: wikitext_file(cfg.dataset_dir, split) for split in WIKITEXT_FILES}
        return Source(f"WikiText directory {cfg.dataset_dir}",
                      "wikitext-dir:" + ",".join(sha256_file(p) for p in files.values()) + mode,
                      lambda: {split: read(p) for split, p in files.items()}, report)
    train, valid = cfg.train_file, cfg.validation_file
    fp = f"files:{sha256_file(train)}:{train.rsplit('.', 1)[-1]}"
    if valid:
        fp += f":{sha256_file(valid)}:{valid.rsplit('.', 1)[-1]}"
        return Source(f"{train} + {valid}", fp + mode, lambda: {"train": read(train), "validation": read(valid)},
                      report)
    pct = cfg.validation_split_percentage
    return Source(f"{train} ({pct}% held out)", f"{fp}:holdout{pct}{mode}",
                  lambda: carve_validation(read(train), pct, train), report)


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
    fp += _mode(cfg)
    report = TextReport()

    def split_texts(split: str) -> list[str]:  # Arrow strings are UTF-8: only non-string values can occur
        origin = f"dataset {label} split {split}"
        return clean_values(dd[split]["text"], cfg.text_errors, origin, report)

    def load() -> dict[str, list[str]]:
        texts = {"train": split_texts("train"), "validation": split_texts("validation")} if "validation" in dd \
            else carve_validation(split_texts("train"), pct, label)
        if "test" in dd and not cfg.test_file:  # --test_file replaces it
            texts["test"] = split_texts("test")
        return texts
    return Source(f"Hub dataset {label}", fp if "validation" in dd else f"{fp}:holdout{pct}", load, report)


def _with_test_file(source: Source, cfg: TrainConfig, path: str) -> Source:
    """source with its test split read from a local file (--test_file, or wiki.test.raw in --dataset_dir)."""

    def load() -> dict[str, list[str]]:
        texts = source.load()
        texts["test"] = read_text_file(path, cfg.text_errors, source.report, text_copies_dir(cfg))
        return texts
    return Source(f"{source.description}, test {path}",
                  f"{source.fingerprint}|test:{sha256_file(path)}:{path.rsplit('.', 1)[-1]}{_mode(cfg)}", load,
                  source.report)


def build_source(cfg: TrainConfig) -> Source:
    source = _local_source(cfg) if (cfg.dataset_dir or cfg.train_file) else _hub_source(cfg)
    path = test_file(cfg)
    return _with_test_file(source, cfg, path) if path else source


# ---------------------------------------------------------------------- one split as a stream
def _stream_error(label: str, e: Exception) -> UserError:
    return UserError(f"could not stream dataset {label!r} ({hub_failure(e)}); check the name and your "
                     "connection, or stream local files with --train_file/--validation_file or --dataset_dir")


def local_file(cfg: TrainConfig, split: str) -> Optional[str]:
    """The local file a split is read from; None for a Hub dataset's split, and for a test split that neither
    --test_file nor --dataset_dir provides."""
    if split == "test":
        return test_file(cfg)
    if cfg.dataset_dir:
        return wikitext_file(cfg.dataset_dir, split)
    if cfg.train_file:
        return cfg.train_file if split == "train" else cfg.validation_file
    return None


def open_split(cfg: TrainConfig, split: str, report: Optional[TextReport] = None, missing_ok: bool = False):
    """One split as a datasets IterableDataset with a 'text' column (and perhaps others). A local file with
    undecodable bytes is streamed from its marked UTF-8 copy (mlm/cleaning.py); report counts them.
    missing_ok: None for a split the source does not have (the test split is optional)."""
    import datasets
    path = local_file(cfg, split)
    if path is not None:
        readable = path if path.endswith(".parquet") else \
            readable_copy(path, cfg.text_errors, report if report is not None else TextReport(), text_copies_dir(cfg))
        ds = datasets.load_dataset(builder_for(path), data_files={split: readable}, split=split, streaming=True)
        label = path
    elif cfg.dataset_dir or cfg.train_file:
        return None  # a local source without a test split
    else:
        label = hub_label(cfg.dataset_name, cfg.dataset_config_name)
        try:
            ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split, streaming=True)
        except ValueError as e:
            if "split" in str(e).lower() and missing_ok:
                return None
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


def split_label(cfg: TrainConfig, split: str) -> str:
    """How a split's rows are named in messages: the local file, or the Hub dataset and split."""
    path = local_file(cfg, split)
    if path is not None:
        return path
    return f"dataset {hub_label(cfg.dataset_name, cfg.dataset_config_name)} split {split}"


def whole_split(cfg: TrainConfig, split: str, report: TextReport) -> Optional[list[str]]:
    """The whole validation (or test) split, read from its stream: it is finite, and evaluation must count each
    example exactly once. None for a test split the source does not have."""
    ds = open_split(cfg, split, report, missing_ok=split == "test")
    if ds is None:
        return None
    return clean_values((row["text"] for row in ds), cfg.text_errors, split_label(cfg, split), report)
