"""Messy real-world text (mlm/data/cleaning.py, --text_errors): undecodable bytes in every local text format and
non-string `text` values in every format and on the Hub path get a one-line error (the default) or are replaced or
skipped with a count, never a traceback and never a silent drop. Null stays an empty text."""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_text_file, tiny_args, train_here

from mlm.common.cli import UserError
from mlm.config import parse_args
from mlm.data import cleaning, sources
from mlm.data.cleaning import TextReport

BAD = b"caf\xe9 au lait"  # Latin-1 bytes: \xe9 is not UTF-8 on its own
VALUES = ["plain text", None, 3, ["a", "b"], {"k": 1}, True, 2.5]


def write(path, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def bad_file(tmp_path, suffix: str) -> tuple[str, int, int]:
    """A file of the format whose third row holds an undecodable byte: (path, its byte offset, its line)."""
    rows = [b"first row", b"second row", BAD, b"last row"]
    if suffix in (".txt", ".raw"):
        lines = rows
    elif suffix == ".jsonl":
        lines = [b'{"text": "' + r + b'"}' for r in rows]
    elif suffix == ".json":  # a JSON array, one object per line
        lines = [b"["] + [b'{"text": "' + r + b'"}' + (b"," if i < 3 else b"") for i, r in enumerate(rows)] + [b"]"]
    else:  # .csv
        lines = [b"id,text"] + [b"%d,%s" % (i, r) for i, r in enumerate(rows)]
    data = b"\n".join(lines) + b"\n"
    return write(tmp_path / f"t{suffix}", data), data.index(b"\xe9"), data[: data.index(b"\xe9")].count(b"\n") + 1


@pytest.mark.parametrize("suffix", [".txt", ".raw", ".jsonl", ".json", ".csv"])
def test_undecodable_bytes_in_every_local_format(suffix, tmp_path):
    path, offset, line = bad_file(tmp_path, suffix)
    with pytest.raises(UserError) as e:
        sources.read_text_file(path)
    message = str(e.value)
    assert message.startswith(f"{path}: invalid UTF-8 at byte {offset} (line {line}: b'\\xe9')"), message
    assert "--text_errors replace" in message and "--text_errors skip" in message and "\n" not in message
    report = TextReport()
    replaced = sources.read_text_file(path, "replace", report, str(tmp_path / "copies"))
    assert "caf\ufffd au lait" in replaced and "first row" in replaced and "last row" in replaced
    assert report.counts == {path: {"invalid UTF-8 sequences replaced": 1}}
    report = TextReport()
    skipped = sources.read_text_file(path, "skip", report, str(tmp_path / "copies"))
    assert skipped == [t for t in replaced if "caf" not in t]  # only that row is gone
    assert report.counts[path]["lines or rows with invalid UTF-8 skipped"] == 1
    assert "skip" in report.describe("skip") and os.path.basename(path) in report.describe("skip")


def test_the_scan_finds_a_bad_byte_beyond_its_first_block(tmp_path, monkeypatch):
    """Blocks end at newlines, so a multi-byte character or a bad byte is never cut; offsets are the file's."""
    monkeypatch.setattr(cleaning, "BLOCK", 64)
    good = ("naïve café ünïcödé line\n" * 20).encode()
    path = write(tmp_path / "big.txt", good + b"one more\n" + b"bad \xff here\n")
    assert cleaning.first_bad_byte(path) == (len(good) + 13, 22, b"\xff")
    assert cleaning.first_bad_byte(write(tmp_path / "ok.txt", good)) is None


def jsonl_values(tmp_path) -> str:
    return write(tmp_path / "v.jsonl", "\n".join(json.dumps({"text": v}) for v in VALUES).encode() + b"\n")


def test_non_string_text_values_in_jsonl(tmp_path):
    path = jsonl_values(tmp_path)
    with pytest.raises(UserError, match=rf"^{path} row 3: 'text' is int 3, not a string; .*--text_errors replace"):
        sources.read_text_file(path)
    report = TextReport()
    assert sources.read_text_file(path, "replace", report) == [
        "plain text",
        "",
        "3",
        "a b",
        '{"k": 1}',
        "true",
        "2.5",
    ]  # null stays an empty text, in every mode
    assert report.counts == {path: {"non-string 'text' values converted": 5}}
    report = TextReport()
    assert sources.read_text_file(path, "skip", report) == ["plain text", ""]
    assert report.counts == {path: {"rows with a non-string 'text' skipped": 5}}


def test_non_string_text_values_in_parquet(tmp_path):
    import datasets

    path = str(tmp_path / "v.parquet")
    datasets.Dataset.from_dict({"text": [1, None, 3]}).to_parquet(path)
    with pytest.raises(UserError, match=r"row 1: 'text' is int 1"):
        sources.read_text_file(path)
    assert sources.read_text_file(path, "replace") == ["1", "", "3"]
    assert sources.read_text_file(path, "skip") == [""]


def test_non_string_text_values_on_the_hub_path(tmp_path, monkeypatch):
    import datasets

    mixed = datasets.Features({"text": datasets.Json()})
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": v} for v in VALUES], features=mixed),
            "validation": datasets.Dataset.from_list([{"text": "ok"}, {"text": None}], features=mixed),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    cfg = lambda mode: parse_args(["--dataset_name", "someone/scraped", "--text_errors", mode])
    with pytest.raises(UserError, match=r"^dataset someone/scraped split train row 3: 'text' is int 3"):
        sources.build_source(cfg("error")).load()
    source = sources.build_source(cfg("replace"))
    texts = source.load()
    assert texts["train"][3] == "a b" and texts["validation"] == ["ok", ""]
    assert source.report.counts == {"dataset someone/scraped split train": {"non-string 'text' values converted": 5}}
    skip = sources.build_source(cfg("skip"))
    assert skip.load()["train"] == ["plain text", ""] and skip.fingerprint != source.fingerprint


@pytest.fixture
def messy_files(tmp_path):
    train = make_text_file(str(tmp_path / "train.txt"), n_lines=200, seed=3)
    with open(train, "ab") as fh:
        fh.write(b"scraped text with a stray \x93quote\x94 in it\n")
    valid = make_text_file(str(tmp_path / "valid.jsonl.txt"), n_lines=40, seed=4)
    rows = [{"text": line.rstrip("\n")} for line in open(valid, encoding="utf-8")] + [{"text": 42}]
    valid = write(tmp_path / "valid.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    return train, valid


def test_a_run_on_messy_files_stops_with_one_line_or_counts_what_it_replaced(
    messy_files, tmp_path, tiny_config_dir, tokenizer_path, capsys
):
    train, valid = messy_files
    args = lambda out, **kw: tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / out),
        str(tmp_path / "cache"),
        train_file=train,
        validation_file=valid,
        max_train_steps=2,
        **kw,
    )
    capsys.readouterr()
    assert train_here(args("strict")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"error: {train}: invalid UTF-8 at byte" in err and "--text_errors" in err
    assert train_here(args("replaced", text_errors="replace")) == 0
    out = capsys.readouterr().out
    assert "messy text" in out and "--text_errors replace" in out and "2 invalid UTF-8 sequences replaced" in out
    assert "1 non-string 'text' values converted" in out


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_stream_with_non_string_rows(mode, tmp_path, tiny_config_dir, tokenizer_path, capfd):
    """In a stream the rows are met in a loader worker: an error is still one line, a skip is told."""
    rows = [
        {"text": line.rstrip("\n")}
        for line in open(make_text_file(str(tmp_path / "t.txt"), n_lines=300, seed=8), encoding="utf-8")
    ]
    rows.insert(5, {"text": [1, 2]})
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    valid = make_text_file(str(tmp_path / "valid.txt"), n_lines=40, seed=9)
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=train,
        validation_file=valid,
        max_train_steps=2,
        streaming="true",
        text_errors=mode,
        shuffle_buffer_size=10,
    )
    capfd.readouterr()
    code = train_here(args)
    captured = capfd.readouterr()  # file descriptors: the loader worker is another process
    if mode == "error":
        assert code == 2
        assert captured.err.count("error:") == 1 and "Traceback" not in captured.err, captured.err
        assert f"error: {train}: a row: 'text' is list [1, 2], not a string" in captured.err
    else:
        assert code == 0, captured.err[-2000:]
        assert "rows with a non-string 'text' skipped (--text_errors skip)" in captured.err
