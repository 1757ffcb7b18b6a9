"""A user's own data (issue 23 d): the text column(s) of a competition CSV, several files and globs per split,
rows empty after joining skipped and counted, on local files and Hub-style datasets, cached and streamed."""

from __future__ import annotations

import csv
import os

import pytest
from helpers import make_text_file, read_json, tiny_args, train_here

from mlm.common.cli import UserError
from mlm.config import parse_args
from mlm.data.cleaning import TextReport
from mlm.data.sources import TextColumns, build_source, read_text_file, whole_split

ESSAYS = [
    ("e1", "The first essay is about dogs.", "Why dogs?"),
    ("e2", "", ""),  # empty after joining: skipped and counted
    ("e3", "A second essay, with a comma.", ""),
    ("e4", "", "Only a prompt here."),
]


def write_csv(path: str, rows, header=("essay_id", "full_text", "prompt")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def config(tmp_path, *args: str):
    return parse_args([*args, "--output_dir", str(tmp_path / "out"), "--report_to", "none"])


def test_a_csv_without_a_text_column_names_its_columns_and_the_option(tmp_path):
    path = write_csv(str(tmp_path / "train.csv"), ESSAYS)
    with pytest.raises(UserError) as e:
        read_text_file(path)
    assert "has no 'text' column (columns: essay_id, full_text, prompt)" in str(e.value)
    assert "--text_column NAME" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(
        UserError,
        match=r"has no column 'body' \(columns: essay_id, full_text, prompt\); give "
        r"--text_column",
    ):
        read_text_file(path, columns=TextColumns(("full_text", "body"), given=True))


def test_a_spreadsheet_export_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = str(tmp_path / "export.csv")
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:  # as Excel writes "CSV UTF-8"
        fh.write("full_text,score\nFirst essay.,3\nSecond essay.,4\n")
    assert read_text_file(path, columns=TextColumns(("full_text",), given=True)) == ["First essay.", "Second essay."]


def test_text_columns_are_joined_and_empty_rows_skipped_and_counted(tmp_path):
    path = write_csv(str(tmp_path / "train.csv"), ESSAYS)
    report = TextReport()
    texts = read_text_file(path, report=report, columns=TextColumns(("prompt", "full_text"), " || ", True))
    assert texts == [
        "Why dogs? || The first essay is about dogs.",
        "A second essay, with a comma.",
        "Only a prompt here.",
    ]
    assert report.counts == {path: {"rows empty after joining --text_column skipped": 1}}
    assert report.describe("error") == "train.csv: 1 rows empty after joining --text_column skipped"
    one = read_text_file(path, report=TextReport(), columns=TextColumns(("full_text",), given=True))
    assert one == ["The first essay is about dogs.", "A second essay, with a comma."]


def test_several_files_and_globs_make_one_split_in_the_order_given(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(3):
        write_csv(str(d / f"part-{i}.csv"), [(f"{i}-{j}", f"text {i} {j}", "") for j in range(3)])
    valid = write_csv(str(tmp_path / "valid.csv"), [("v", "valid text", "")])
    cfg = config(
        tmp_path,
        "--train_file",
        str(d / "part-2.csv"),
        str(d / "part-[01].csv"),
        "--validation_file",
        valid,
        "--text_column",
        "full_text",
    )
    assert cfg.train_file == [str(d / "part-2.csv"), str(d / "part-0.csv"), str(d / "part-1.csv")]
    texts = build_source(cfg).load()
    assert texts["train"] == [f"text {i} {j}" for i in (2, 0, 1) for j in range(3)]
    assert texts["validation"] == ["valid text"]
    # A glob through a --config file (a single string) expands the same way.
    yaml_file = tmp_path / "opts.yaml"
    yaml_file.write_text(f"train_file: {d}/part-*.csv\ntext_column: full_text\n")
    assert parse_args(["--config", str(yaml_file), "--output_dir", str(tmp_path / "o2")]).train_file == [
        str(d / f"part-{i}.csv") for i in range(3)
    ]


@pytest.mark.parametrize(
    "given, problem",
    [
        (
            ["{d}/part-0.csv", "{d}/missing.csv", "{d}/also-missing.csv"],
            "--train_file '{d}/missing.csv' does not exist",
        ),
        (["{d}/nothing-*.csv"], "--train_file '{d}/nothing-*.csv' matches no file"),
        (["{d}/part-0.csv", "{d}/notes.txt"], "--train_file mixes formats (csv, text)"),
    ],
)
def test_a_missing_file_or_glob_is_named_in_one_line(tmp_path, given, problem):
    d = tmp_path / "data"
    d.mkdir()
    write_csv(str(d / "part-0.csv"), ESSAYS)
    make_text_file(str(d / "notes.txt"), n_lines=5)
    with pytest.raises(UserError) as e:
        config(tmp_path, "--train_file", *[g.format(d=d) for g in given])
    assert problem.format(d=d) in str(e.value) and "\n" not in str(e.value)


def test_a_hub_style_dataset_reads_its_text_columns_cached_and_streamed(tmp_path):
    """A dataset directory loaded by name (datasets' own loader, as for a Hub id), and the same split streamed:
    the same texts."""
    d = tmp_path / "competition"
    d.mkdir()
    rows = [(f"id{i}", f"essay number {i} " * 3, f"prompt {i % 3}") for i in range(30)] + [("empty", "", "")]
    write_csv(str(d / "train.csv"), rows)
    write_csv(str(d / "validation.csv"), rows[:5])
    cfg = config(tmp_path, "--dataset_name", str(d), "--text_column", "prompt,full_text", "--text_separator", "\\n")
    assert cfg.text_separator == "\n"
    source = build_source(cfg)
    texts = source.load()
    assert texts["train"][0] == "prompt 0\n" + "essay number 0 " * 3 and len(texts["train"]) == 30
    assert any("rows empty after joining" in w for by in source.report.counts.values() for w in by)
    streamed = whole_split(
        config(
            tmp_path,
            "--dataset_name",
            str(d),
            "--text_column",
            "prompt,full_text",
            "--streaming",
            "--max_train_steps",
            "1",
        ),
        "validation",
        TextReport(),
    )
    assert streamed == texts["validation"]
    with pytest.raises(UserError, match="has no 'text' column .*--text_column"):
        build_source(config(tmp_path, "--dataset_name", str(d)))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_run_on_a_competition_csv(tmp_path, tiny_config_dir, tokenizer_path, capsys, streaming):
    """Train on essays in `full_text` (with empty rows) from several files, cached and streamed."""
    d = tmp_path / "data"
    d.mkdir()
    words = open(make_text_file(str(tmp_path / "words.txt"), n_lines=300, seed=4)).read().split("\n")
    for part in range(2):
        write_csv(
            str(d / f"train-{part}.csv"),
            [(f"{part}-{i}", w, "") for i, w in enumerate(words[part::2])] + [("blank", "", "")],
        )
    valid = write_csv(str(tmp_path / "valid.csv"), [(f"v{i}", w, "") for i, w in enumerate(words[:60])])
    out = str(tmp_path / "run")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=str(d / "train-*.csv"),
        validation_file=valid,
        text_column="full_text",
        max_train_steps=2,
        **({"streaming": "true"} if streaming else {}),
    )
    assert train_here(args) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "best", "model.safetensors"))
    saved = read_json(os.path.join(out, "run_config.json"))
    assert saved["train_file"] == [str(d / "train-0.csv"), str(d / "train-1.csv")]
    if not streaming:  # the banner counts the skipped rows (a stream's are told as met)
        assert "rows empty after joining --text_column skipped" in stdout
