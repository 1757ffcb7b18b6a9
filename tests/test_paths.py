"""Acceptance (issue 32 b): every option that names a path, and the default a run falls back to, is checked
before any work, on every rank: each kind of bad path is one `error:` line that names the option, the path and
the fix, exit 2, no traceback, and nothing created or deleted.

The table (option x kind of bad path) runs on 2 ranks: every cell with the variables torchrun gives its workers
(tests/rank_pool.py, which ends the other ranks with SIGTERM once one has failed, as torchrun does), and one cell
of each kind under real torchrun, whose per-worker logs show what each rank printed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest
from helpers import ROOT, make_text_file, read_only_dir, run_train, tiny_args
from test_bad_input import check_error_line, lines, worker_logs


@dataclass(frozen=True)
class Case:
    args: list[str]
    problem: list[str]
    fix: str
    env: dict = field(default_factory=dict)
    cwd: str = ROOT


# What each kind of bad path is called in the line.
KIND_WORDS = {
    "empty": "is empty",
    "missing": "does not exist",
    "file_for_dir": "is a file",
    "dir_for_file": "is a directory",
    "unwritable": "cannot be written",
}
# Options whose path is a file the run reads (each split's text, the probe's rows).
FILE_OPTIONS = ["train_file", "validation_file", "test_file", "probe_file", "config"]
# Directories (or Hub ids) the run reads.
READ_DIRS = ["model_name_or_path", "tokenizer_name", "config_name", "dataset_dir", "resume_from_checkpoint"]
# Directories the run writes, and the defaults: the cache of runs without --data_cache_dir ($XDG_CACHE_HOME), and
# the output directory of runs without --output_dir (outputs/ in the current directory).
WRITE_DIRS = ["output_dir", "data_cache_dir", "default_cache", "default_output"]

# The fix each option's line gives (a substring of it).
FIXES = {
    "output_dir": "choose another --output_dir",
    "default_output": "choose another --output_dir",
    "data_cache_dir": "point --data_cache_dir at a directory you can write",
    "default_cache": "point --data_cache_dir at a directory you can write",
    "train_file": "give",
    "validation_file": "give",
    "test_file": "give",
    "probe_file": "give",
    "config": "give",
    "model_name_or_path": "give a Hub id",
    "tokenizer_name": "give a Hub id",
    "config_name": "give a Hub id",
    "dataset_dir": "give the folder holding wiki.train.raw",
    "resume_from_checkpoint": "give a checkpoints/step-N folder, 'auto' or 'none'",
}
# What a path of the right kind but without what the run needs is called: an empty file, a model directory
# without config.json, a tokenizer directory without tokenizer files, a checkpoint folder without a checkpoint.
HOLDS_NOTHING = {
    **{o: "is empty" for o in FILE_OPTIONS},
    "model_name_or_path": "no config.json",
    "tokenizer_name": "holds no tokenizer files",
    "config_name": "no config.json",
    "dataset_dir": "wiki.train.raw",
    "resume_from_checkpoint": "is not a checkpoint",
}

TABLE = (
    [(o, k) for o in FILE_OPTIONS for k in ("empty", "missing", "dir_for_file", "holds_nothing")]
    + [(o, k) for o in READ_DIRS for k in ("empty", "missing", "file_for_dir", "holds_nothing")]
    + [(o, k) for o in WRITE_DIRS[:2] for k in ("empty", "file_for_dir", "unwritable")]
    + [(o, k) for o in WRITE_DIRS[2:] for k in ("file_for_dir", "unwritable")]
)
# One cell of each kind under real torchrun.
UNDER_TORCHRUN = [
    ("output_dir", "empty"),
    ("train_file", "missing"),
    ("data_cache_dir", "file_for_dir"),
    ("probe_file", "dir_for_file"),
    ("default_cache", "unwritable"),
    ("resume_from_checkpoint", "holds_nothing"),
]


def bad_path(kind: str, tmp_path, option: str) -> str:
    """A path of this kind (made on disk where it must exist)."""
    base = tmp_path / f"bad-{option}"
    if kind == "empty":
        return ""
    if kind == "missing":
        return str(base) + (".txt" if option in FILE_OPTIONS else "")
    if kind == "file_for_dir":
        base.write_text("a file, not a directory\n")
        return str(base)
    if kind == "dir_for_file":
        base.mkdir()
        return str(base)
    if kind == "unwritable":
        return os.path.join(read_only_dir(tmp_path), "run")
    if kind == "holds_nothing":
        if option in FILE_OPTIONS:
            path = tmp_path / f"bad-{option}.txt"
            path.write_bytes(b"")
            return str(path)
        base.mkdir()
        return str(base)
    raise ValueError(kind)


def path_case(option: str, kind: str, tmp_path, config_dir: str, tokenizer: str) -> Case:
    """A valid tiny run but for one bad path."""
    text = make_text_file(str(tmp_path / "train.txt"), n_lines=200)
    out, cache = str(tmp_path / "out"), str(tmp_path / "data-cache")
    kw: dict = {"train_file": text}
    env: dict = {}
    named, cwd = f"--{option}", ROOT
    path = bad_path(kind, tmp_path, option) if option != "default_output" else "outputs"
    if option == "default_output":  # the current directory is read-only, or holds a file named outputs
        out, named = None, "the default --output_dir"
        if kind == "unwritable":
            cwd = read_only_dir(tmp_path)
        else:
            cwd = str(tmp_path / "cwd")
            os.makedirs(cwd)
            (tmp_path / "cwd" / "outputs").write_text("a file, not a directory\n")
    elif option == "output_dir":
        out = path
    elif option == "data_cache_dir":
        cache = path
    elif option == "default_cache":
        kw["data_cache_dir"] = None
        env["XDG_CACHE_HOME"] = path
        named = "the default data cache"
    elif option == "dataset_dir":
        kw.update(train_file=None, dataset_dir=path)
    elif option == "model_name_or_path":
        kw.update(config_name=None, model_name_or_path=path)
    else:
        kw[option] = path
    problem = [named, KIND_WORDS.get(kind) or HOLDS_NOTHING[option]]
    if path:
        problem.append(os.path.basename(path))
    return Case(tiny_args(config_dir, tokenizer, out, cache, **kw), problem, FIXES[option], env, cwd)


def assert_nothing_made(tmp_path) -> None:
    """No output directory or data cache was made for a run that stopped on its options."""
    assert not (tmp_path / "out").exists() and not (tmp_path / "data-cache").exists()


@pytest.mark.parametrize("option,kind", TABLE)
def test_a_bad_path_is_one_line_on_two_ranks(option, kind, tmp_path, tiny_config_dir, tokenizer_path):
    case = path_case(option, kind, tmp_path, tiny_config_dir, tokenizer_path)
    r = run_train(case.args, nproc=2, extra_env=case.env, timeout=60, cwd=case.cwd)
    assert r.returncode != 0 and "Traceback" not in r.output, r.output
    check_error_line(r.stderr, case)  # one line from the two ranks: rank 0's
    assert not lines(r.stdout), r.stdout
    assert_nothing_made(tmp_path)


@pytest.mark.parametrize("option,kind", UNDER_TORCHRUN)
def test_a_bad_path_under_torchrun(option, kind, tmp_path, tiny_config_dir, tokenizer_path):
    case = path_case(option, kind, tmp_path, tiny_config_dir, tokenizer_path)
    log_dir = str(tmp_path / "torchrun-logs")
    r = run_train(
        case.args,
        nproc=2,
        timeout=120,
        extra_env=case.env,
        torchrun_args=["--log-dir", log_dir, "--redirects", "3"],
        cwd=case.cwd,
    )
    assert r.returncode != 0
    out0, err0 = worker_logs(log_dir, 0)
    out1, err1 = worker_logs(log_dir, 1)
    for text in (out0, err0, out1, err1):
        assert "Traceback" not in text, text
    check_error_line(err0, case)
    assert not lines(out0) and not lines(out1 + err1), out1 + err1
    assert_nothing_made(tmp_path)


def test_the_table_covers_every_option_that_names_a_path():
    """A new path option joins the table (TrainConfig's fields named like a path)."""
    import dataclasses

    from mlm.config import TrainConfig

    named = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name.endswith(("_file", "_dir", "_path", "_name")) or f.name == "resume_from_checkpoint"
    }
    covered = {o for o, _ in TABLE}
    not_paths = {"dataset_name", "dataset_config_name", "overwrite_output_dir", "wandb_run_name"}
    assert named - not_paths <= covered, sorted(named - not_paths - covered)


EARLY_SCRIPT = """
import runpy, sys
sys.argv = ["train_ddp.py", *sys.argv[1:]]
try:
    runpy.run_path("train_ddp.py", run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "torch imported:", "torch" in sys.modules)
"""


def test_a_bad_path_is_answered_before_torch_is_imported(tmp_path):
    """python train_ddp.py (each torchrun worker) answers a bad option before its imports, which take seconds."""
    from helpers import ROOT, run_command

    r = run_command(
        [sys.executable, "-c", EARLY_SCRIPT, "--train_file", str(tmp_path / "missing.txt")], timeout=60, cwd=ROOT
    )
    assert r.stdout.strip() == "exit 2 torch imported: False", r.output
    assert "--train_file" in r.stderr and "does not exist" in r.stderr
