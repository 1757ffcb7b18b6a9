"""Acceptance (issue 32 f): every malformed input that the cached path answers in one line gets the same line
on the streamed path (--streaming), each case run both ways as a world of one in this process (what
`python train_ddp.py` runs; a streamed split's rows are met in a loader worker, another process, so the output is
read from the file descriptors)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from helpers import make_text_file, tiny_args, train_here


@dataclass(frozen=True)
class Malformed:
    suffix: str
    content: bytes
    said: list[str]  # substrings of the one error line (the file is named in every case)
    options: tuple = ()  # (name, value) pairs beyond the tiny run's


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_ROWS = [{"text": f"the cat sat on the mat number {i} ."} for i in range(300)]

CASES = {
    "invalid_utf8": Malformed(
        ".txt", b"fine text here\n" * 50 + b"he said \x93hello\x94\n" + b"more text\n" * 50, ["invalid UTF-8"]
    ),
    "broken_json_line": Malformed(
        ".jsonl", _jsonl(GOOD_ROWS[:2]) + b'{"text": "a row cut short\n' + _jsonl(GOOD_ROWS[2:]), ["not valid JSON"]
    ),
    "non_string_text": Malformed(
        ".jsonl", _jsonl(GOOD_ROWS[:5] + [{"text": 12}] + GOOD_ROWS[5:]), ["'text' is int 12"]
    ),
    "ragged_csv": Malformed(
        ".csv",
        b"text\n" + b"a fine row of text\n" * 50 + b"a,b,c\n" + b"more text\n" * 50,
        ["could not read", "Expected 1 fields in line 52, saw 3"],
    ),
    "rows_not_objects": Malformed(".jsonl", b'["a", "list"]\n' * 50, ["line 1 is a JSON list, not an object"]),
    "blank_json_texts": Malformed(".jsonl", _jsonl([{"text": "  "}] * 100), ["blank lines"]),
    "no_text_column": Malformed(".csv", b"id,label\n" + b"1,a\n" * 100, ["has no 'text' column", "--text_column"]),
    "text_column_missing": Malformed(
        ".jsonl", _jsonl(GOOD_ROWS), ["'body'", "--text_column"], (("text_column", "body"),)
    ),
    "only_blank_lines": Malformed(".txt", b" \n\n   \n\t\n" * 50, ["blank lines"]),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_training_file_is_one_line_on_both_paths(
    case, streaming, tmp_path, tiny_config_dir, tokenizer_path, capfd
):
    bad = CASES[case]
    train = tmp_path / f"train{bad.suffix}"
    train.write_bytes(bad.content)
    valid = make_text_file(str(tmp_path / "valid.txt"), n_lines=40, seed=9)
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=str(train),
        validation_file=valid,
        max_train_steps=2,
        shuffle_buffer_size=10,
        **dict(bad.options),
    )
    capfd.readouterr()
    code = train_here(args + (["--streaming"] if streaming else []))
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, out[-2000:] + err[-3000:]
    for part in [str(train), *bad.said]:
        assert part in errors[0], f"{part!r} not in: {errors[0]}"
