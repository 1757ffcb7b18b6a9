"""Where the texts come from: a Hub dataset, local files or a WikiText directory, for the cached path (each
split's texts in batches, never whole: a corpus may be larger than memory) and for the streamed one (a split as a
datasets IterableDataset).

Both paths name files, splits and datasets the same way, so they live here, below data.py and streaming.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mlm.common.cli import UserError
from mlm.common.files import sha256_file
from mlm.common.hub import failure as hub_failure
from mlm.config import WIKITEXT_FILES, WIKITEXT_TEST, TrainConfig, builder_for, default_cache_dir
from mlm.data.cleaning import EMPTY_ROWS, TextReport, clean_value, clean_values, readable_copy


def text_copies_dir(cfg: TrainConfig) -> str:
    """Where UTF-8 copies of files with undecodable bytes go (mlm/data/cleaning.py), beside the tokenised cache."""
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


@dataclass(frozen=True)
class TextColumns:
    """Which columns of a csv/json/parquet row or Hub dataset row hold its text (--text_column), and what joins
    them. `given` is False for the default 'text', whose rows are kept as they are (a blank line is a text);
    with --text_column, a row whose joined text is empty is skipped and counted."""

    names: tuple[str, ...] = ("text",)
    separator: str = "\n"
    given: bool = False

    @staticmethod
    def of(cfg: TrainConfig) -> TextColumns:
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
            raise UserError(
                f"{label!r} has no column {missing[0]!r} (columns: {have}); give --text_column one or "
                "more of these, NAME or NAME,NAME"
            )
        raise UserError(
            f"{label!r} has no 'text' column (columns: {have}); name the column holding the text with "
            "--text_column NAME, or several with NAME,NAME"
        )

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

    def texts(
        self, table: dict[str, Sequence[Any]], mode: str, origin: str, report: TextReport, first_row: int = 0
    ) -> list[str]:
        """The texts of a batch of rows given as columns (rows numbered from first_row + 1 in messages)."""
        if not self.given:
            return clean_values(table["text"], mode, origin, report, first_row)
        out = []
        for i, values in enumerate(zip(*(table[n] for n in self.names))):
            text = self.row_text(values, mode, f"{origin} row {first_row + i + 1}", report, origin)
            if text is not None:
                out.append(text)
        return out


# ---------------------------------------------------------------------- splits read in batches (the cached path)
TEXT_BATCH_ROWS = 8192  # texts per batch ...
TEXT_BATCH_CHARS = 16 << 20  # ... or fewer, so that a batch of long documents stays about this size


def _batched(texts: Iterator[str]) -> Iterator[list[str]]:
    """Texts in batches of at most TEXT_BATCH_ROWS texts and about TEXT_BATCH_CHARS characters."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= TEXT_BATCH_ROWS or chars >= TEXT_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _text_lines(path: str) -> Iterator[str]:
    """A text file's lines without their ends, read a block at a time (universal newlines, as str.split after
    read() with them: no empty text after a final newline)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield line[:-1] if line.endswith("\n") else line


def _arrow_batches(ds, columns: TextColumns, mode: str, origin: str, report: TextReport) -> Iterator[list[str]]:
    """The texts of a datasets.Dataset (Arrow on disk, memory-mapped) a batch of rows at a time: only the text
    column(s) of one batch are ever Python objects (decoded as its features say, as ds[column] would)."""
    row = 0
    for values in ds.select_columns(list(columns.names)).iter(batch_size=TEXT_BATCH_ROWS):
        yield columns.texts(values, mode, origin, report, first_row=row)
        row += len(values[columns.names[0]])


def iter_text_file(
    path: str,
    text_errors: str = "error",
    report: Optional[TextReport] = None,
    clean_dir: Optional[str] = None,
    columns: TextColumns = TextColumns(),
) -> Iterator[list[str]]:
    """Texts of a local file in batches: a line each for .txt/.raw; the text column(s) for
    .json/.jsonl/.parquet/.csv. Undecodable bytes and non-string values are handled as text_errors says
    (mlm/data/cleaning.py)."""
    report = report if report is not None else TextReport()
    readable = path if path.endswith(".parquet") else readable_copy(path, text_errors, report, clean_dir)
    if path.endswith((".txt", ".raw")):
        row = 0
        for batch in _batched(_text_lines(readable)):
            yield clean_values(batch, text_errors, path, report, first_row=row)
            row += len(batch)
        return
    import datasets

    kind = builder_for(path)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" for a local file is noise, on every run
    quiet_file_readers()
    try:
        ds = datasets.load_dataset(kind, data_files=readable, split="train", **builder_options(readable))
    except Exception as e:
        raise UserError(
            file_read_error([path], e)
            or f"could not read {path!r} as {kind} ({type(e).__name__}); check the file's format"
        ) from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    columns.check(ds.column_names, path)
    yield from _arrow_batches(ds, columns, text_errors, path, report)


def read_text_file(
    path: str,
    text_errors: str = "error",
    report: Optional[TextReport] = None,
    clean_dir: Optional[str] = None,
    columns: TextColumns = TextColumns(),
) -> list[str]:
    """Every text of a local file, as iter_text_file reads them (for small files and tests)."""
    return [t for batch in iter_text_file(path, text_errors, report, clean_dir, columns) for t in batch]


def files_label(paths: list[str]) -> str:
    """Several files in a message: the first and how many more."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"


def files_fingerprint(paths: list[str]) -> str:
    return ",".join(f"{sha256_file(p)}:{p.rsplit('.', 1)[-1]}" for p in paths)


def holdout_count(texts: int, percentage: int) -> int:
    """How many of the first texts --validation_split_percentage holds out, as run_mlm's train[:N%] does."""
    return texts * percentage // 100


def _no_validation(origin: str) -> UserError:
    return UserError(
        f"{origin} has no validation split; give --validation_file or a --validation_split_percentage above 0"
    )


Batches = Callable[[], Iterator[list[str]]]


@dataclass(frozen=True)
class Source:
    """Where each split's texts come from: a name for messages, a fingerprint, and per part its texts in batches,
    read lazily (train and validation, and test when the source has one; with holdout > 0 there is no validation
    part: validation is the first holdout% of the train part's texts). report: what the reading replaced or
    skipped (--text_errors), filled as it reads. size: about how many characters the parts hold (the files'
    bytes, or the Arrow data's), for a progress bar."""

    description: str
    fingerprint: str
    parts: dict[str, Batches]
    report: TextReport = field(default_factory=TextReport)
    holdout: int = 0
    size: int = 0

    def load(self) -> dict[str, list[str]]:
        """Every split's texts in memory (small data and tests; training reads parts batch by batch)."""
        texts = {split: [t for batch in part() for t in batch] for split, part in self.parts.items()}
        if self.holdout:
            n_val = holdout_count(len(texts["train"]), self.holdout)
            texts["validation"], texts["train"] = texts["train"][:n_val], texts["train"][n_val:]
        return texts


def _mode(cfg: TrainConfig) -> str:
    """The fingerprint's suffix for what turns rows into texts: --text_errors replace and skip give different texts
    from the same file (error gives texts only from clean files), and so do other --text_column choices."""
    mode = "" if cfg.text_errors == "error" else f":text_errors={cfg.text_errors}"
    columns = TextColumns.of(cfg)
    return mode + (f":columns={list(columns.names)}:sep={columns.separator!r}" if columns.given else "")


def _files_part(cfg: TrainConfig, paths: list[str], report: TextReport) -> Batches:
    def batches() -> Iterator[list[str]]:
        for path in paths:
            yield from iter_text_file(path, cfg.text_errors, report, text_copies_dir(cfg), TextColumns.of(cfg))

    return batches


def _files_size(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def _local_source(cfg: TrainConfig) -> Source:
    report, mode = TextReport(), _mode(cfg)
    if cfg.dataset_dir:
        files = {split: wikitext_file(cfg.dataset_dir, split) for split in WIKITEXT_FILES}
        return Source(
            f"WikiText directory {cfg.dataset_dir}",
            "wikitext-dir:" + ",".join(sha256_file(p) for p in files.values()) + mode,
            {split: _files_part(cfg, [p], report) for split, p in files.items()},
            report,
            size=_files_size(list(files.values())),
        )
    train, valid = cfg.train_file, cfg.validation_file
    fp = f"files:{files_fingerprint(train)}"
    if valid:
        fp += f":{files_fingerprint(valid)}"
        return Source(
            f"{files_label(train)} + {files_label(valid)}",
            fp + mode,
            {"train": _files_part(cfg, train, report), "validation": _files_part(cfg, valid, report)},
            report,
            size=_files_size(train + valid),
        )
    pct = cfg.validation_split_percentage
    if pct == 0:
        raise _no_validation(files_label(train))
    return Source(
        f"{files_label(train)} ({pct}% held out)",
        f"{fp}:holdout{pct}{mode}",
        {"train": _files_part(cfg, train, report)},
        report,
        holdout=pct,
        size=_files_size(train),
    )


# datasets' readers log a file that fails in pages of pandas' and pyarrow's tracebacks (a CSV's twice);
# file_read_error says it in one line instead.
_READER_LOGS = [f"datasets.packaged_modules.{kind}.{kind}" for kind in ("json", "csv", "parquet")]


def quiet_file_readers() -> None:
    for name in _READER_LOGS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


READER_PACKAGES = ("pandas", "pyarrow", "datasets", "json")  # whose exceptions say a file could not be read


def _reader_cause(e: Optional[BaseException]) -> Optional[BaseException]:
    """The innermost exception in e's chain that a file reader (pandas, pyarrow, datasets, json) raised."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__module__.split(".")[0] in READER_PACKAGES:
            found = e
        e = e.__cause__ or e.__context__
    return found


def file_read_error(paths: Sequence[str], e: BaseException) -> Optional[str]:
    """One line for a local file that its reader could not read (a JSON line that does not parse, a CSV row
    with more fields than the header, a damaged Parquet file): where, and the reader's own words; None when
    the failure is not a reader's (then it is a bug, and keeps its traceback)."""
    bad = json_lines_error(paths)
    cause = _reader_cause(e)
    if bad or cause is None or not paths:
        return bad
    words = (str(cause).strip().splitlines() or [""])[0]
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (or another of its {len(paths)} files)"
    return (
        f"could not read {where!r} as {builder_for(paths[0])} ({type(cause).__name__}: {words}); check the "
        "file's format"
    )


def json_lines_error(paths: Sequence[str]) -> Optional[str]:
    """Where a JSON file of ours breaks, in one line naming the file and line (datasets says it in pages of its
    own); None when none of them is JSON or all of them parse. Read only after a failure."""
    for path in paths:
        if builder_for(path) != "json" or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.read(4096).lstrip()[:1]
            fh.seek(0)
            if first == "[":  # one JSON document (an array of rows), which datasets reads whole too
                try:
                    json.load(fh)
                    continue
                except ValueError as e:
                    if e.msg != "Extra data" or e.colno != 1:
                        return f"{path!r} line {e.lineno} is not valid JSON ({e.msg}, column {e.colno}); fix the file"
                fh.seek(0)  # more after a first array: JSON Lines whose rows are arrays, found below
            for n, line in enumerate(fh, 1):  # JSON Lines: a line at a time, for a file of any size
                try:
                    row = json.loads(line) if line.strip() else {}
                except ValueError as e:
                    return (
                        f"{path!r} line {n} is not valid JSON ({e.msg}, column {e.colno}); fix that line: each "
                        "line of a JSON Lines file is one object"
                    )
                if not isinstance(row, dict):
                    return (
                        f"{path!r} line {n} is a JSON {type(row).__name__}, not an object; each line of a JSON "
                        'Lines file is one object of columns, such as {"text": "..."}'
                    )
    return None


def arrow_files_fingerprint(ds) -> str:
    """What a Hub split's content is known by: the Arrow files datasets memory-maps it from (their paths name the
    dataset, its configuration and version hash) and their sizes. Dataset.cache_files is public, where the
    dataset's own fingerprint is not."""
    files = [f["filename"] for f in ds.cache_files]
    if not files:  # held in memory: its rows are what it is
        from datasets.fingerprint import Hasher

        return Hasher.hash(ds.data.table.to_pydict())
    return hashlib.sha256(json.dumps([(f, os.path.getsize(f)) for f in files]).encode()).hexdigest()[:16]


def _hub_source(cfg: TrainConfig) -> Source:
    import datasets

    label = hub_label(cfg.dataset_name, cfg.dataset_config_name)
    try:
        dd = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
    except Exception as e:
        raise UserError(
            f"could not load dataset {label!r} ({hub_failure(e)}); check the name and your "
            "connection, or use local data with --train_file or --dataset_dir"
        ) from None
    if "train" not in dd:
        raise UserError(f"dataset {label!r} has no 'train' split (splits: {', '.join(dd)})")
    columns = TextColumns.of(cfg)
    columns.check(dd["train"].column_names, f"dataset {label}")
    pct = cfg.validation_split_percentage
    fp = f"hub:{label}:" + ",".join(f"{k}={arrow_files_fingerprint(v)}" for k, v in sorted(dd.items()))
    fp += _mode(cfg)
    report = TextReport()

    def part(split: str) -> Batches:  # Arrow strings are UTF-8: only non-string values can occur
        origin = f"dataset {label} split {split}"
        columns.check(dd[split].column_names, origin)
        return lambda: _arrow_batches(dd[split], columns, cfg.text_errors, origin, report)

    splits = (
        ["train"]
        + (["validation"] if "validation" in dd else [])
        + (["test"] if "test" in dd and not cfg.test_file else [])
    )  # --test_file replaces the dataset's test split
    if "validation" not in dd and pct == 0:
        raise _no_validation(label)
    size = sum(dd[s].data.nbytes for s in splits)
    return Source(
        f"Hub dataset {label}",
        fp if "validation" in dd else f"{fp}:holdout{pct}",
        {s: part(s) for s in splits},
        report,
        holdout=0 if "validation" in dd else pct,
        size=size,
    )


def _with_test_files(source: Source, cfg: TrainConfig, paths: list[str]) -> Source:
    """source with its test split read from local files (--test_file, or wiki.test.raw in --dataset_dir)."""
    return Source(
        f"{source.description}, test {files_label(paths)}",
        f"{source.fingerprint}|test:{files_fingerprint(paths)}{_mode(cfg)}",
        {**source.parts, "test": _files_part(cfg, paths, source.report)},
        source.report,
        source.holdout,
        source.size + _files_size(paths),
    )


def build_source(cfg: TrainConfig) -> Source:
    source = _local_source(cfg) if (cfg.dataset_dir or cfg.train_file) else _hub_source(cfg)
    paths = test_files(cfg)
    return _with_test_files(source, cfg, paths) if paths else source


# ---------------------------------------------------------------------- one split as a stream
def _stream_error(label: str, e: Exception) -> UserError:
    return UserError(
        f"could not stream dataset {label!r} ({hub_failure(e)}); check the name and your "
        "connection, or stream local files with --train_file/--validation_file or --dataset_dir"
    )


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
    file with undecodable bytes is streamed from its marked UTF-8 copy (mlm/data/cleaning.py); report counts them.
    missing_ok: None for a split the source does not have (the test split is optional)."""
    import datasets

    paths = local_files(cfg, split)
    if paths is not None:
        report = report if report is not None else TextReport()
        readable = [
            p if p.endswith(".parquet") else readable_copy(p, cfg.text_errors, report, text_copies_dir(cfg))
            for p in paths
        ]
        quiet_file_readers()
        ds = datasets.load_dataset(
            builder_for(paths[0]),
            data_files={split: readable},
            split=split,
            streaming=True,
            **builder_options(readable[0]),
        )
        label = files_label(paths)
    elif cfg.dataset_dir or cfg.train_file:
        return None  # a local source without a test split
    else:
        label = hub_label(cfg.dataset_name, cfg.dataset_config_name)
        try:  # every split, lazily: which ones the dataset has is then a key lookup
            splits = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming=True)
        except Exception as e:
            raise _stream_error(label, e) from None
        if split not in splits:
            if missing_ok:
                return None
            raise UserError(
                f"dataset {label!r} has no {split!r} split; --streaming reads the validation "
                "split whole, so use a dataset that has one, or local files"
            )
        ds = splits[split]
    try:
        columns = stream_columns(ds)
    except Exception as e:  # reading a file's first rows: say which line breaks it, as the cached path does
        bad = file_read_error(paths or [], e)
        if bad is None:
            raise
        raise UserError(bad) from None
    split_columns(cfg, split).check(columns, label)
    return ds


def stream_columns(ds) -> list[str]:
    """A stream's columns (they must be known to drop the others): from its features, or, for a stream that
    does not declare them, from its first example."""
    return list(ds.column_names) if ds.column_names is not None else list(next(iter(ds.take(1)), {}))


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


def no_text_error(description: str) -> UserError:
    """A training split without a token: the same line on the cached and the streamed path."""
    return UserError(
        f"the training text ({description}) holds no tokens, only blank lines or whitespace; give a file that holds "
        "text"
    )


def _split_texts(cfg: TrainConfig, split: str, ds, report: TextReport) -> Iterator[Optional[str]]:
    """Each row's text of an opened split (None for a row --text_errors skips); a reader's failure (a JSON line
    that does not parse, a ragged CSV row) is its one line, as on the cached path."""
    columns, label = split_columns(cfg, split), split_label(cfg, split)
    try:
        for i, row in enumerate(ds):
            values = [row[n] for n in columns.names]
            yield columns.row_text(values, cfg.text_errors, f"{label} row {i + 1}", report, label)
    except UserError:
        raise
    except Exception as e:
        bad = file_read_error(local_files(cfg, split) or [], e)
        if bad is None:
            raise
        raise UserError(bad) from None


BLANK_PEEK_ROWS = 10_000  # a stream read this far with no text yet is left to training to judge


def blank_stream(cfg: TrainConfig, split: str = "train") -> bool:
    """Whether a streamed split ends within its first BLANK_PEEK_ROWS rows without any text (the cached path
    finds that when it has tokenised everything; a stream is never read whole before training)."""
    seen = 0
    for text in itertools.islice(_split_texts(cfg, split, open_split(cfg, split), TextReport()), BLANK_PEEK_ROWS):
        seen += 1
        if text and text.strip():
            return False
    return seen < BLANK_PEEK_ROWS


def whole_split(cfg: TrainConfig, split: str, report: TextReport) -> Optional[list[str]]:
    """The whole validation (or test) split, read from its stream: it is finite, and evaluation must count each
    example exactly once. None for a test split the source does not have."""
    ds = open_split(cfg, split, report, missing_ok=split == "test")
    if ds is None:
        return None
    return [t for t in _split_texts(cfg, split, ds, report) if t is not None]
