"""Where the texts come from: a Hub dataset, local files or a WikiText directory, for the cached path (every
split's texts, read whole) and for the streamed one (a split as a datasets IterableDataset).

Both paths name files, splits and datasets the same way, so they live here, below data.py and streaming.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .cleaning import EMPTY_ROWS, TextReport, clean_value, clean_values, readable_copy
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


def test_files(cfg: TrainConfig) -> Optional[list[str]]:
    """The local files of the test split: --test_file, else wiki.test.raw in --dataset_dir when it is there."""
    if cfg.test_file:
        return list(cfg.test_file)
    if cfg.dataset_dir and os.path.isfile(wikitext_file(cfg.dataset_dir, "test")):
        return [wikitext_file(cfg.dataset_dir, "test")]
    return None


def hub_label(name: str, config_name: str | None) -> str:
    """How a Hub dataset is named in messages: name/configuration."""
    return f"{name}/{config_name}" if config_name else name


def builder_for(path: str) -> str:
    """The `datasets` packaged builder that reads a local file of this kind."""
    suffix = path.rsplit(".", 1)[-1]
    return {"txt": "text", "raw": "text", "jsonl": "json"}.get(suffix, suffix)


def builder_options(path: str) -> dict[str, Any]:
    """Options for that builder. A CSV cell is text: every column (named by the file's header) is read as a
    string, so that a column type-guessed differently in two files (all empty in one, numbers in another)
    cannot stop a split of several files."""
    if builder_for(path) != "csv":
        return {}
    import csv

    import datasets
    # utf-8-sig: a byte-order mark (spreadsheet exports) is no part of the first column's name, as for pandas.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})} if header else {}


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


@dataclass(frozen=True)
class TextColumns:
    """Which columns of a csv/json/parquet row or Hub dataset row hold its text (--text_column), and what joins
    them. `given` is False for the default 'text', whose rows are kept as they are (a blank line is a text);
    with --text_column, a row whose joined text is empty is skipped and counted."""
    names: tuple[str, ...] = ("text",)
    separator: str = "\n"
    given: bool = False

    @staticmethod
    def of(cfg: TrainConfig) -> "TextColumns":
        if not cfg.text_column:
            return TextColumns()
        return TextColumns(tuple(n.strip() for n in cfg.text_column.split(",")), cfg.text_separator, True)

    def check(self, columns: list[str], label: str) -> None:
        """A one-line error when a wanted column is missing, listing the columns there are."""
        missing = [n for n in self.names if n not in columns]
        if not missing:
            return
        have = ", ".join(columns)
        if self.given:
            raise UserError(f"{label!r} has no column {missing[0]!r} (columns: {have}); give --text_column one or "
                            "more of these, NAME or NAME,NAME")
        raise UserError(f"{label!r} has no 'text' column (columns: {have}); name the column holding the text with "
                        "--text_column NAME, or several with NAME,NAME")

    def row_text(self, values: Sequence[Any], mode: str, where: str, report: TextReport, origin: str) -> Optional[str]:
        """One row's text from its column values (in self.names' order); None when the row is skipped."""
        if not self.given:
            return clean_value(values[0], mode, where, report, origin)
        parts = [clean_value(v, mode, where, report, origin, column=n) for n, v in zip(self.names, values)]
        if any(p is None for p in parts):
            return None
        text = self.separator.join(p for p in parts if p)
        if not text.strip():
            report.add(origin, EMPTY_ROWS)
            return None
        return text

    def texts(self, table: dict[str, Sequence[Any]], mode: str, origin: str, report: TextReport,
              first_row: int = 0) -> list[str]:
        """The texts of a batch of rows given as columns (rows numbered from first_row + 1 in messages)."""
        if not self.given:
            return clean_values(table["text"], mode, origin, report, first_row)
        out = []
        for i, values in enumerate(zip(*(table[n] for n in self.names))):
            text = self.row_text(values, mode, f"{origin} row {first_row + i + 1}", report, origin)
            if text is not None:
                out.append(text)
        return out


def read_text_file(path: str, text_errors: str = "error", report: Optional[TextReport] = None,
                   clean_dir: Optional[str] = None, columns: TextColumns = TextColumns()) -> list[str]:
    """Texts of a local file: a line each for .txt/.raw; the text column(s) for .json/.jsonl/.parquet/.csv.
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
        ds = datasets.load_dataset(kind, data_files=readable, split="train", **builder_options(readable))
    except Exception as e:
        raise UserError(f"could not read {path!r} as {kind} ({type(e).__name__}); check the file's format") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    columns.check(ds.column_names, path)
    return columns.texts({n: ds[n] for n in columns.names}, text_errors, path, report)


def read_files(paths: list[str], text_errors: str, report: TextReport, clean_dir: Optional[str],
               columns: TextColumns) -> list[str]:
    """The texts of several files of one split, in the order given."""
    return [t for p in paths for t in read_text_file(p, text_errors, report, clean_dir, columns)]


def files_label(paths: list[str]) -> str:
    """Several files in a message: the first and how many more."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"


def files_fingerprint(paths: list[str]) -> str:
    return ",".join(f"{sha256_file(p)}:{p.rsplit('.', 1)[-1]}" for p in paths)


def carve_validation(texts: list[str], percentage: int, origin: str) -> dict[str, list[str]]:
    """Hold out the first `percentage`% of rows, as run_mlm's train[:N%] / train[N%:] split does."""
    if percentage == 0:
        raise UserError(f"{origin} has no validation split; give --validation_file or a "
                        "--validation_split_percentage above 0")
    n_val = len(texts) * percentage // 100
    return {"train": texts[n_val:], "validation": texts[:n_val]}


def _mode(cfg: TrainConfig) -> str:
    """The fingerprint's suffix for what turns rows into texts: --text_errors replace and skip give different texts
    from the same file (error gives texts only from clean files), and so do other --text_column choices."""
    mode = "" if cfg.text_errors == "error" else f":text_errors={cfg.text_errors}"
    columns = TextColumns.of(cfg)
    return mode + (f":columns={list(columns.names)}:sep={columns.separator!r}" if columns.given else "")


def _local_source(cfg: TrainConfig) -> Source:
    report = TextReport()
    mode = _mode(cfg)

    def read(paths: list[str]) -> list[str]:
        return read_files(paths, cfg.text_errors, report, text_copies_dir(cfg), TextColumns.of(cfg))
    if cfg.dataset_dir:
        files = {split: wikitext_file(cfg.dataset_dir, split) for split in WIKITEXT_FILES}
        return Source(f"WikiText directory {cfg.dataset_dir}",
                      "wikitext-dir:" + ",".join(sha256_file(p) for p in files.values()) + mode,
                      lambda: {split: read([p]) for split, p in files.items()}, report)
    train, valid = cfg.train_file, cfg.validation_file
    fp = f"files:{files_fingerprint(train)}"
    if valid:
        fp += f":{files_fingerprint(valid)}"
        return Source(f"{files_label(train)} + {files_label(valid)}", fp + mode,
                      lambda: {"train": read(train), "validation": read(valid)}, report)
    pct = cfg.validation_split_percentage
    return Source(f"{files_label(train)} ({pct}% held out)", f"{fp}:holdout{pct}{mode}",
                  lambda: carve_validation(read(train), pct, files_label(train)), report)


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
    columns = TextColumns.of(cfg)
    columns.check(dd["train"].column_names, f"dataset {label}")
    pct = cfg.validation_split_percentage
    fp = f"hub:{label}:" + ",".join(f"{k}={v._fingerprint}" for k, v in sorted(dd.items()))
    fp += _mode(cfg)
    report = TextReport()

    def split_texts(split: str) -> list[str]:  # Arrow strings are UTF-8: only non-string values can occur
        origin = f"dataset {label} split {split}"
        columns.check(dd[split].column_names, origin)
        return columns.texts({n: dd[split][n] for n in columns.names}, cfg.text_errors, origin, report)

    def load() -> dict[str, list[str]]:
        texts = {"train": split_texts("train"), "validation": split_texts("validation")} if "validation" in dd \
            else carve_validation(split_texts("train"), pct, label)
        if "test" in dd and not cfg.test_file:  # --test_file replaces it
            texts["test"] = split_texts("test")
        return texts
    return Source(f"Hub dataset {label}", fp if "validation" in dd else f"{fp}:holdout{pct}", load, report)


def _with_test_files(source: Source, cfg: TrainConfig, paths: list[str]) -> Source:
    """source with its test split read from local files (--test_file, or wiki.test.raw in --dataset_dir)."""

    def load() -> dict[str, list[str]]:
        texts = source.load()
        texts["test"] = read_files(paths, cfg.text_errors, source.report, text_copies_dir(cfg), TextColumns.of(cfg))
        return texts
    return Source(f"{source.description}, test {files_label(paths)}",
                  f"{source.fingerprint}|test:{files_fingerprint(paths)}{_mode(cfg)}", load, source.report)


def build_source(cfg: TrainConfig) -> Source:
    source = _local_source(cfg) if (cfg.dataset_dir or cfg.train_file) else _hub_source(cfg)
    paths = test_files(cfg)
    return _with_test_files(source, cfg, paths) if paths else source


# ---------------------------------------------------------------------- one split as a stream
def _stream_error(label: str, e: Exception) -> UserError:
    return UserError(f"could not stream dataset {label!r} ({hub_failure(e)}); check the name and your "
                     "connection, or stream local files with --train_file/--validation_file or --dataset_dir")


def local_files(cfg: TrainConfig, split: str) -> Optional[list[str]]:
    """The local files a split is read from; None for a Hub dataset's split, and for a test split that neither
    --test_file nor --dataset_dir provides."""
    if split == "test":
        return test_files(cfg)
    if cfg.dataset_dir:
        return [wikitext_file(cfg.dataset_dir, split)]
    if cfg.train_file:
        return list(cfg.train_file if split == "train" else cfg.validation_file)
    return None


def open_split(cfg: TrainConfig, split: str, report: Optional[TextReport] = None, missing_ok: bool = False):
    """One split as a datasets IterableDataset holding the --text_column column(s) (and perhaps others). A local
    file with undecodable bytes is streamed from its marked UTF-8 copy (mlm/cleaning.py); report counts them.
    missing_ok: None for a split the source does not have (the test split is optional)."""
    import datasets
    paths = local_files(cfg, split)
    if paths is not None:
        report = report if report is not None else TextReport()
        readable = [p if p.endswith(".parquet") else readable_copy(p, cfg.text_errors, report, text_copies_dir(cfg))
                    for p in paths]
        ds = datasets.load_dataset(builder_for(paths[0]), data_files={split: readable}, split=split, streaming=True,
                                   **builder_options(readable[0]))
        label = files_label(paths)
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
    split_columns(cfg, split).check(list(ds.column_names), label)
    return ds


def split_columns(cfg: TrainConfig, split: str) -> TextColumns:
    """The columns a split's rows are read from: a text file has one, 'text', whatever --text_column says."""
    paths = local_files(cfg, split)
    return TextColumns() if paths and paths[0].endswith((".txt", ".raw")) else TextColumns.of(cfg)


def split_label(cfg: TrainConfig, split: str) -> str:
    """How a split's rows are named in messages: the local file(s), or the Hub dataset and split."""
    paths = local_files(cfg, split)
    if paths is not None:
        return files_label(paths)
    return f"dataset {hub_label(cfg.dataset_name, cfg.dataset_config_name)} split {split}"


def whole_split(cfg: TrainConfig, split: str, report: TextReport) -> Optional[list[str]]:
    """The whole validation (or test) split, read from its stream: it is finite, and evaluation must count each
    example exactly once. None for a test split the source does not have."""
    ds = open_split(cfg, split, report, missing_ok=split == "test")
    if ds is None:
        return None
    columns, label = split_columns(cfg, split), split_label(cfg, split)
    texts = (columns.row_text([row[n] for n in columns.names], cfg.text_errors, f"{label} row {i + 1}", report, label)
             for i, row in enumerate(ds))
    return [t for t in texts if t is not None]
