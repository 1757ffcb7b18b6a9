"""Messy text: bytes that are not UTF-8 and `text` values that are not strings, handled as --text_errors says.

  error (default)  a one-line error naming the file and the byte offset and line of the first undecodable byte,
                   or the row whose `text` is not a string, and the options below. Undecodable bytes mean a file
                   in another encoding (Latin-1, Windows-1252) as often as a few stray bytes: training on the
                   result would be silent mojibake, so the default stops and says so.
  replace          undecodable bytes become U+FFFD (the tokenizer's [UNK]); a number or boolean becomes its text,
                   a list of strings its items joined by spaces, anything else its JSON text.
  skip             a line (text files) or row (other formats) with undecodable bytes or a non-string `text` is
                   dropped.
A null `text` is an empty text in every mode. Whatever was replaced or skipped is counted in the banner.

Undecodable bytes are found by a scan of the raw file before any reader sees it (text files are split at
newlines, which are never inside a UTF-8 sequence, so the scan holds one block at a time). A file that has them is
decoded once with each bad sequence marked by SENTINEL, a Unicode noncharacter that real text never holds; that
copy is what the reader (ours or datasets') then reads, so the rows that held bad bytes are known afterwards
whatever the format. Hub datasets are Arrow data, whose strings are valid UTF-8 by construction: only non-string
values can occur there.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from mlm.common.cli import UserError

EMPTY_ROWS = "rows empty after joining --text_column skipped"  # counted beside what --text_errors did
SENTINEL = "\ufffe"  # a noncharacter: marks where undecodable bytes were in a decoded copy
BLOCK = 16 << 20
FIX = (
    "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass --text_errors replace (U+FFFD, "
    "read as [UNK]) or --text_errors skip (drops the line or row)"
)


def _mark(error: UnicodeDecodeError) -> tuple[str, int]:
    return SENTINEL, error.end


codecs.register_error("mlm-mark", _mark)


@dataclass
class TextReport:
    """What was replaced or skipped, per origin (a file, or a dataset's split), for the banner."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, origin: str, what: str, n: int = 1) -> None:
        by = self.counts.setdefault(origin, {})
        by[what] = by.get(what, 0) + n

    def merge(self, other: dict[str, dict[str, int]]) -> None:
        for origin, by in other.items():
            for what, n in by.items():
                self.add(origin, what, n)

    def describe(self, mode: str) -> Optional[str]:
        if not self.counts:
            return None
        parts = [
            f"{os.path.basename(o) or o}: " + ", ".join(f"{n} {w}" for w, n in sorted(by.items()))
            for o, by in sorted(self.counts.items())
        ]
        messy = any(w != EMPTY_ROWS for by in self.counts.values() for w in by)
        return (f"--text_errors {mode}: " if messy else "") + "; ".join(parts)


def _blocks(path: str) -> Iterable[tuple[int, bytes]]:
    """(offset, bytes) of the file in blocks that end at a newline (or at the end of the file)."""
    with open(path, "rb") as fh:
        offset, carry = 0, b""
        while True:
            chunk = fh.read(BLOCK)
            if not chunk:
                if carry:
                    yield offset, carry
                return
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            yield offset, data[:cut]
            offset, carry = offset + cut, data[cut:]


def first_bad_byte(path: str) -> Optional[tuple[int, int, bytes]]:
    """(byte offset, line, the bad bytes) of the file's first undecodable UTF-8 sequence; None if it has none."""
    lines = 0
    for offset, data in _blocks(path):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return offset + e.start, lines + data.count(b"\n", 0, e.start) + 1, data[e.start : e.end]
        lines += data.count(b"\n")
    return None


def undecodable_message(path: str, found: tuple[int, int, bytes]) -> str:
    offset, line, bad = found
    return f"{path}: invalid UTF-8 at byte {offset} (line {line}: {bad!r}); {FIX}"


def readable_copy(path: str, mode: str, report: TextReport, clean_dir: Optional[str] = None) -> str:
    """The path a reader should open: the file itself when it is valid UTF-8; else (replace/skip) a UTF-8 copy in
    clean_dir (a temporary directory when None) with each undecodable sequence marked by SENTINEL. With
    mode 'error', a file with undecodable bytes is a UserError."""
    found = first_bad_byte(path)
    if found is None:
        return path
    if mode == "error":
        raise UserError(undecodable_message(path, found))
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    clean_dir = clean_dir or tempfile.mkdtemp(prefix="mlm-text-")
    os.makedirs(clean_dir, exist_ok=True)
    suffix = path.rsplit(".", 1)[-1]
    copy = os.path.join(clean_dir, f"{digest.hexdigest()[:24]}.marked.{suffix}")
    marks = 0
    tmp = f"{copy}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for _, data in _blocks(path):
            text = data.decode("utf-8", errors="mlm-mark")
            marks += text.count(SENTINEL)
            out.write(text)
    os.replace(tmp, copy)  # every rank may write it: the same bytes, renamed atomically
    report.add(path, "invalid UTF-8 sequences " + ("replaced" if mode == "replace" else "found"), marks)
    return copy


def _as_text(value: Any) -> str:
    """A non-string `text` as text: a list of strings joined by spaces, a number as written, else its JSON."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def clean_value(
    value: Any, mode: str, where: str, report: TextReport, origin: str, column: str = "text"
) -> Optional[str]:
    """One row's `text` (or other text column): the string to train on, or None when the row is skipped. where
    names the row."""
    if value is None:
        return ""
    if isinstance(value, str):
        if SENTINEL not in value:
            return value
        if mode == "skip":
            report.add(origin, "lines or rows with invalid UTF-8 skipped")
            return None
        return value.replace(SENTINEL, "\ufffd")
    if mode == "error":
        shown = repr(value)
        raise UserError(
            f"{where}: {column!r} is {type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}, "
            "not a string; fix the data, or pass --text_errors replace (uses the value's text) or "
            "--text_errors skip (drops the row)"
        )
    if mode == "skip":
        report.add(origin, f"rows with a non-string {column!r} skipped")
        return None
    report.add(origin, f"non-string {column!r} values converted")
    return _as_text(value)


def clean_values(values: Iterable[Any], mode: str, origin: str, report: TextReport, first_row: int = 0) -> list[str]:
    """Every row's `text` of one file or split (rows numbered from first_row + 1)."""
    out = []
    for i, value in enumerate(values):
        text = clean_value(value, mode, f"{origin} row {first_row + i + 1}", report, origin)
        if text is not None:
            out.append(text)
    return out
