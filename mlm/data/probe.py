"""The downstream probe's rows (--probe_file): labelled texts, the kind of task their labels make, and the checks
that turn a probe file that cannot be fitted into one line naming the fix.

The labels decide the task: text or true/false labels are classes; numbers are a regression (an essay's score),
unless --probe_task classification says they are class ids."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional

from mlm.common.cli import UserError
from mlm.config import TrainConfig, builder_for
from mlm.data.sources import builder_options, file_read_error, files_label, quiet_file_readers

CLASSIFICATION, REGRESSION = "classification", "regression"


@dataclass(frozen=True)
class ProbeSet:
    """The probe's rows in file order, and what their labels are."""

    texts: list[str]
    targets: list[float]  # class index (classification) or the number (regression), one per text
    task: str  # CLASSIFICATION or REGRESSION
    classes: list[str]  # class names in index order; [] for a regression
    origin: str  # the files, for messages
    file_rows: int = 0  # the rows of the files, when these are a sample of them (--max_probe_samples)

    def identity(self) -> str:
        """ "60 rows (content 3f2a...)": the rows' count and content, short. A resume that picks best/ by the probe
        must probe the same rows, and base figures compare only with figures of the same rows."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps([self.texts, self.targets]).encode()).hexdigest()[:12]
        return f"{len(self.texts)} rows (content {digest})"

    def describe(self) -> str:
        """The banner's line: rows, task and what the labels are."""
        rows = f"{len(self.texts)}{f' of {self.file_rows}' if self.file_rows else ''} rows of {self.origin}"
        if self.task == CLASSIFICATION:
            shown = ", ".join(self.classes[:6]) + (", ..." if len(self.classes) > 6 else "")
            return f"{rows}, {len(self.classes)} classes ({shown})"
        lo, hi = min(self.targets), max(self.targets)
        return f"{rows}, regression on numbers from {lo:g} to {hi:g}"


def _number(v: Any) -> Optional[float]:
    """The label as a number, or None: JSON and parquet numbers, and a CSV cell's text that reads as one (the
    CSV reader takes every cell as text)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        number = float(v)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _rows(cfg: TrainConfig, paths: list[str]) -> tuple[list[str], list[dict]]:
    """(column names, rows) of the probe files, read by the datasets library's packaged builders."""
    import datasets

    quiet_file_readers()
    ds = datasets.load_dataset(
        builder_for(paths[0]), data_files={"probe": paths}, split="probe", streaming=True, **builder_options(paths[0])
    )
    try:
        rows = list(ds)
    except Exception as e:  # a JSON line that does not parse (...): say which, as the training files do
        bad = file_read_error(paths, e)
        if bad is None:
            raise
        raise UserError(bad) from None
    columns = list(ds.column_names) if ds.column_names is not None else list(rows[0]) if rows else []
    return columns, rows


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def load_probe(cfg: TrainConfig, folds: Optional[int] = None) -> ProbeSet:
    """The probe's rows, checked: every row has a text and a label, and the labels can be cross-validated in
    `folds` folds (cfg.probe_folds); a sample of them under --max_probe_samples."""
    folds = folds or cfg.probe_folds
    rows = _load_rows(cfg, folds)
    if cfg.max_probe_samples is None or cfg.max_probe_samples >= len(rows.texts):
        return rows
    return _sample(rows, cfg.max_probe_samples, folds, cfg.seed)


def _sample(rows: ProbeSet, size: int, folds: int, seed: int) -> ProbeSet:
    """`size` rows drawn once by the seed, in file order; classes keep their shares (scikit-learn's stratified
    split), so every class keeps the rows its folds need where the sample can hold them."""
    from sklearn.model_selection import train_test_split

    stratify = rows.targets if rows.task == CLASSIFICATION else None
    try:
        kept, _ = train_test_split(range(len(rows.texts)), train_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # fewer rows than classes
        kept = []
    kept = sorted(kept)
    if rows.task == CLASSIFICATION:
        counts = Counter(rows.targets[i] for i in kept)
        fewest = min(counts.get(float(c), 0) for c in range(len(rows.classes)))
        _check(
            fewest >= folds,
            f"--max_probe_samples {size}: a sample of {size} of the {len(rows.texts)} rows of {rows.origin} leaves "
            f"a class with {fewest} row(s), fewer than the {folds} folds (there are {len(rows.classes)} classes); "
            "give a larger --max_probe_samples",
        )
    return replace(
        rows,
        texts=[rows.texts[i] for i in kept],
        targets=[rows.targets[i] for i in kept],
        file_rows=len(rows.texts),
    )


def _load_rows(cfg: TrainConfig, folds: int) -> ProbeSet:
    """Every row of the probe files, checked."""
    paths = list(cfg.probe_file or [])
    origin = files_label(paths)
    _check(not paths[0].endswith((".txt", ".raw")), f"--probe_file {origin}: give a csv, json, jsonl or parquet file")
    columns, rows = _rows(cfg, paths)
    _check(bool(rows), f"--probe_file {origin} has no rows; give a file with a text and a label per row")
    names = tuple(n.strip() for n in (cfg.probe_text_column or cfg.text_column or "text").split(","))
    label = cfg.probe_label_column
    for flag, wanted in [("--probe_text_column", n) for n in names] + [("--probe_label_column", label)]:
        _check(
            wanted in columns,
            f"{flag} {wanted!r} is not a column of {origin} (columns: {', '.join(columns)}); "
            f"give {flag} the column that holds the {'labels' if wanted == label else 'text'}",
        )
    texts, labels = [], []
    unlabelled, textless = [], []
    for i, row in enumerate(rows):
        text = cfg.text_separator.join(str(row[n]) for n in names if not _missing(row[n]))
        if not text.strip():
            textless.append(i + 1)
        if _missing(row[label]):
            unlabelled.append(i + 1)
        texts.append(text)
        labels.append(row[label])
    for bad, what in ((unlabelled, f"no {label!r} label"), (textless, "no text")):
        if bad:
            raise UserError(
                f"--probe_file {origin}: {len(bad)} of {len(rows)} rows have {what} (first: row {bad[0]}); "
                "fill them in or drop those rows"
            )
    numbers = [_number(v) for v in labels]
    numeric = all(n is not None for n in numbers)
    task = cfg.probe_task if cfg.probe_task != "auto" else (REGRESSION if numeric else CLASSIFICATION)
    _check(
        task == CLASSIFICATION or numeric,
        f"--probe_task regression: the {label!r} labels of {origin} are not all numbers; "
        "use --probe_task classification (or auto)",
    )
    _check(
        len(rows) >= 2 * folds,
        f"--probe_file {origin} has {len(rows)} rows, too few for a {folds}-fold cross-validated probe; give at "
        f"least {2 * folds} rows (a few hundred give steady figures) or a smaller --probe_folds",
    )
    if task == REGRESSION:
        targets = [float(n) for n in numbers]
        _check(
            len(set(targets)) > 1,
            f"--probe_file {origin}: every row has the {label!r} value {targets[0]:g}; a regression probe needs "
            "labels that vary",
        )
        return ProbeSet(texts, targets, task, [], origin)
    # Class names as written; a class id read from JSON (3) and from a CSV cell ("3") is the same class.
    names = [f"{n:g}" if n is not None else str(v) for n, v in zip(numbers, labels)]
    counts = Counter(names)
    _check(
        len(counts) > 1,
        f"--probe_file {origin}: every row has the {label!r} label {names[0]!r}; a probe needs at least two classes",
    )
    rare, n = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    _check(
        n >= folds,
        f"--probe_file {origin}: {len(counts)} classes in {len(rows)} rows, and class {rare!r} has {n} row(s), "
        f"fewer than the {folds} folds of the cross-validation; give every class at least {folds} rows, merge "
        f"rare classes, or check that --probe_label_column {label!r} holds labels, not ids",
    )
    classes = sorted(counts, key=_class_order)
    index = {c: i for i, c in enumerate(classes)}
    return ProbeSet(texts, [float(index[c]) for c in names], task, classes, origin)


def _class_order(name: str) -> tuple:
    """Numbers in numeric order (2 before 10), then names."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)
