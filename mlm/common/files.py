"""Files a run writes and reads back: content hashes, atomic JSON and directory replacement, and the one reader
of training_history.json (resume, plot and search all read it here)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any, Optional, TextIO

from mlm.common import messages

HISTORY = "training_history.json"
RUN_CONFIG = "run_config.json"
# What a run writes in its output_dir, by name; --overwrite_output_dir removes these and nothing else, so a
# user's own files stay wherever they are (docs/DESIGN.md, "A run's directory").
RUN_FILES = (HISTORY, RUN_CONFIG)
RUN_DIRS = ("wandb",)  # W&B's own folder (offline runs, run files)
CHECKPOINT_DIR = re.compile(r"^(\.tmp-)?step-\d+(\.old)?$")  # under checkpoints/: saves, torn saves
# best/ holds save_pretrained's files (weights, config, any tokenizer kind's vocabulary), the metrics and the card.
EXPORT_FILE = re.compile(
    r"^(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
    r"|vocab|merges|chat_template|eval_results|test_results)\.(json|txt|jinja)$"
    r"|^(spm|spiece|sentencepiece\.bpe|tokenizer)\.model$|^README\.md$"
    r"|^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$"
)
# How a full disk (or a reached quota) shows: the OSError of a plain write, or, where the writer raises
# another type, its message (mlm.common.messages.DISK_FULL).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(Exception):
    """A write found no space left: raised on every rank at the same step (rank 0's carries the message)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether exc, or an exception it was raised from, is a write that failed for lack of space."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if not isinstance(exc, OSError) and messages.names(str(exc), messages.DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str) -> int:
    """Free space on the disk that holds path (or its nearest existing parent)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


HASH_BLOCK = 1 << 22  # bytes read at a time: hashing a file of any size holds one block


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    """Written to a temporary file, flushed, renamed: a reader sees the old file or the new one, never half."""
    _write_atomic(path, lambda fh: json.dump(obj, fh, indent=1, default=str))


def write_text_atomic(path: str, text: str) -> None:
    """As write_json_atomic, for text."""
    _write_atomic(path, lambda fh: fh.write(text))


def _write_atomic(path: str, write: Callable[[TextIO], Any]) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a full disk: the old file stays, the half-written one goes
            os.remove(tmp)
        raise


def replace_dir(tmp: str, final: str) -> None:
    """Flush every file under tmp, then move it to final; an older final is removed only after the move (a crash
    in between leaves `final.old`, which checkpoint.recover_interrupted_saves puts back)."""
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    old = None
    if os.path.exists(final):
        old = f"{final}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final) or ".")
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------------- the training history
# training_history.json is a JSON list with one entry a line, so that a run appends an entry without rewriting
# the file: over a long run, each log costs the same.
_LIST_END = b"\n]\n"


def write_json_list(path: str, entries: list[Any]) -> None:
    """The list, atomically, one entry a line (append_json_list adds to it)."""
    lines = ",\n".join(json.dumps(e, default=str) for e in entries)
    write_text_atomic(path, f"[\n{lines}\n]\n" if entries else "[\n]\n")


def append_json_list(path: str, entry: Any) -> None:
    """Add one entry to a list written by write_json_list: the closing bracket is overwritten by the entry and a
    new bracket. A write that fails (a full disk) truncates the file back to the list it was."""
    line = json.dumps(entry, default=str).encode()
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END) - len(_LIST_END)
        fh.seek(end - 1)
        first = fh.read(1) == b"["
        fh.seek(end)
        try:
            fh.write((b"\n" if first else b",\n") + line + _LIST_END)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            fh.seek(end)
            fh.truncate()
            fh.write(_LIST_END)
            fh.flush()
            raise


def read_history(output_dir: str) -> Optional[list[dict]]:
    """The entries of a run's training_history.json: None when there is no file or it holds no JSON list.
    A file cut short (a process killed while appending) gives the entries before the cut."""
    try:
        with open(os.path.join(output_dir, HISTORY), encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    try:
        history = json.loads(text)
    except ValueError:
        return _entries_before_a_cut(text)
    return history if isinstance(history, list) else None


def _entries_before_a_cut(text: str) -> Optional[list[dict]]:
    lines = text.splitlines()
    if not lines or lines[0] != "[":
        return None
    entries = []
    for line in lines[1:]:
        try:
            entries.append(json.loads(line.rstrip(",")))
        except ValueError:
            break
    return entries


def train_entries(history: list[dict]) -> list[dict]:
    """The logged training steps: {"step", "epoch", "loss", "lr", ...}."""
    return [h for h in history if "loss" in h]


def eval_entries(history: list[dict]) -> list[dict]:
    """The evaluations, flattened: {"step", "epoch", "loss", "perplexity", "accuracy", ...}."""
    return [{**h["eval"], "step": h["step"], "epoch": h.get("epoch")} for h in history if "eval" in h]


# What tokenizer.save_pretrained always writes one of: a directory without any holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


# ---------------------------------------------------------------------- what --overwrite_output_dir removes
def _children(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def run_written_paths(output_dir: str) -> list[str]:
    """The existing files and folders in output_dir that a run wrote, by name: step-N checkpoints (and torn
    saves), best/'s export files (and an unfinished best.tmp/best.old), the history, the run config, W&B's folder."""
    found = [os.path.join(output_dir, n) for n in RUN_FILES + RUN_DIRS + ("best.tmp", "best.old")]
    checkpoints = os.path.join(output_dir, "checkpoints")
    found += [os.path.join(checkpoints, n) for n in _children(checkpoints) if CHECKPOINT_DIR.match(n)]
    best = os.path.join(output_dir, "best")
    found += [os.path.join(best, n) for n in _children(best) if EXPORT_FILE.match(n)]
    return [p for p in found if os.path.lexists(p)]


def clear_run_dir(output_dir: str) -> None:
    """Remove what a run wrote in output_dir (run_written_paths); checkpoints/ and best/ go too once empty."""
    for path in run_written_paths(output_dir):
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in ("checkpoints", "best"):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def _within(path: str, area: str) -> bool:
    return path == area or path.startswith(area.rstrip(os.sep) + os.sep)


def input_in_run_dir(output_dir: str, inputs: dict[str, list[str]]) -> Optional[tuple[str, str]]:
    """The first (option, path) among inputs (option -> the local paths it reads) that lies where a run writes
    in output_dir: in checkpoints/ or best/, or one of the run's files. --overwrite_output_dir would delete it."""
    out = os.path.realpath(output_dir)
    areas = [os.path.join(out, n) for n in ("checkpoints", "best", "best.tmp", "best.old") + RUN_FILES + RUN_DIRS]
    for option, paths in inputs.items():
        for path in paths:
            if any(_within(os.path.realpath(path), area) for area in areas):
                return option, path
    return None
