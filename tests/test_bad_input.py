"""Acceptance: bad input gives a one-line error naming the problem and its fix, a non-zero exit within 60 s on
every rank, and no traceback.

Each case runs twice: under `torchrun --nproc_per_node=2` (gloo) with every worker's stdout and stderr
redirected to its own file, and as a world of one in this process (`train_ddp.main`, what plain
`python train_ddp.py` runs). torchrun itself prints a ChildFailedError report (with the launcher's own
traceback) when a worker exits non-zero; that is the launcher's output, not ours, so the no-traceback check
reads each worker's files.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import pytest
import torch
from helpers import _env, make_text_file, run_train, start_ranks, tiny_args, wait_all

from mlm.common.cli import UserError

TIME_LIMIT_S = 60.0
NOT_CACHED = "some_dataset_that_is_not_cached"


@dataclass(frozen=True)
class Case:
    args: list[str]
    problem: list[str]  # substrings that name the problem (the option, the file, the value)
    fix: str  # a substring of the suggested fix
    env: dict = field(default_factory=dict)


def _without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def build_case(name: str, tmp_path, config_dir: str, tokenizer: str) -> Case:
    """The arguments of one bad-input case; everything else is a valid tiny run."""
    text = make_text_file(str(tmp_path / "train.txt"), n_lines=200)
    out, cache = str(tmp_path / "out"), str(tmp_path / "data-cache")

    def args(output_dir: str = out, **kw) -> list[str]:
        return tiny_args(config_dir, tokenizer, output_dir, cache, **{"train_file": text, **kw})

    if name == "missing_train_file":
        return Case(
            args(train_file=str(tmp_path / "missing.txt")),
            ["--train_file", "missing.txt", "does not exist"],
            "give the path of an existing text file",
        )
    if name == "blank_train_file":  # non-empty on disk, so it is caught only after tokenisation on rank 0
        (tmp_path / "blank.txt").write_text(" \n\n   \n\t\n" * 50)
        return Case(
            args(train_file=str(tmp_path / "blank.txt")), ["blank.txt", "blank lines"], "give a file that holds text"
        )
    if name == "invalid_utf8_train_file":  # scraped text with a Windows-1252 quote in it
        with open(text, "ab") as fh:
            fh.write(b"he said \x93hello\x94\n")
        return Case(args(), ["train.txt", "invalid UTF-8 at byte", "line 201"], "--text_errors replace")
    if name == "non_string_jsonl_text":
        (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": 12}\n')
        return Case(
            args(train_file=str(tmp_path / "rows.jsonl")),
            ["rows.jsonl row 2", "'text' is int 12"],
            "--text_errors skip",
        )
    if name == "hub_dataset_offline":
        hf_cache = tmp_path / "hf-datasets"  # empty, so nothing is cached
        hf_cache.mkdir()
        return Case(
            args(train_file=None, dataset_name=NOT_CACHED),
            [f"'{NOT_CACHED}'", "offline"],
            "--train_file",
            env={"HF_DATASETS_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
    if name == "max_seq_length_beyond_positions":  # the tiny config has 128 position embeddings
        return Case(
            args(max_seq_length=256),
            ["--max_seq_length 256", "128 position embeddings"],
            "--max_seq_length 128 or less",
        )
    if name.startswith("mlm_probability_"):
        value = name.rsplit("_", 1)[1]
        return Case(args(mlm_probability=value), ["--mlm_probability", "(0, 1)", f"got {float(value)}"], "0.15")
    if name == "batch_size_zero":
        return Case(args(per_device_train_batch_size=0), ["--per_device_train_batch_size", "got 0"], "at least 1")
    if name == "from_scratch_without_tokenizer":
        return Case(
            _without(args(), "--tokenizer_name"),
            ["--config_name", "holds a config but no tokenizer"],
            "pass --tokenizer_name",
        )
    if name == "resume_from_an_export":  # best/ is a model export, not a checkpoint
        best = tmp_path / "out" / "best"
        best.mkdir(parents=True)
        (best / "config.json").write_text("{}")
        return Case(
            args(resume_from_checkpoint=str(best)),
            ["--resume_from_checkpoint", "best", "is an exported model"],
            f"--model_name_or_path {best}",
        )
    if name == "held_out_split_of_no_rows":  # 1% of 20 texts rounds down to none
        few = make_text_file(str(tmp_path / "few.txt"), n_lines=20)
        return Case(
            args(train_file=few, validation_split_percentage=1),
            ["the validation split has no rows", "--validation_split_percentage (1)"],
            "or give --validation_file",
        )
    if name == "unknown_option":
        return Case(args() + ["--no_such_option", "3"], ["unrecognized arguments", "--no_such_option"], "--help")
    raise ValueError(name)


CASES = [
    "missing_train_file",
    "blank_train_file",
    "invalid_utf8_train_file",
    "non_string_jsonl_text",
    "hub_dataset_offline",
    "max_seq_length_beyond_positions",
    "mlm_probability_0",
    "mlm_probability_1",
    "batch_size_zero",
    "from_scratch_without_tokenizer",
    "resume_from_an_export",
    "held_out_split_of_no_rows",
    "unknown_option",
]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def check_error_line(stderr: str, case: Case) -> None:
    got = lines(stderr)
    assert len(got) == 1, f"expected exactly one line on stderr, got {len(got)}:\n{stderr}"
    line = got[0]
    assert line.startswith("error: "), line
    for part in case.problem:
        assert part in line, f"{part!r} (the problem) not named in: {line}"
    assert case.fix in line, f"{case.fix!r} (the fix) not named in: {line}"


def worker_logs(log_dir: str, local_rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one worker, from torchrun's <log_dir>/<run id>/attempt_0/<local rank>/ files."""
    runs = glob.glob(os.path.join(log_dir, "*", "attempt_0"))
    assert len(runs) == 1, f"expected one torchrun run under {log_dir}, found {runs}"
    paths = [os.path.join(runs[0], str(local_rank), f"{s}.log") for s in ("stdout", "stderr")]
    for p in paths:
        assert os.path.isfile(p), f"torchrun wrote no {p}"
    return tuple(open(p, encoding="utf-8", errors="replace").read() for p in paths)


# Under torchrun, the place an error arises on rank 0 while the others wait for it: its data preparation (the
# other data cases take its path). The options (every rank, before its imports) run under torchrun in
# tests/test_paths.py; an error every rank meets by itself (the model's config) is test_every_rank_exits_by_itself's.
# Each case's message is checked in one process below.
TORCHRUN_CASES = ["blank_train_file"]


@pytest.mark.parametrize("name", TORCHRUN_CASES)
def test_bad_input_under_torchrun(name, tmp_path, tiny_config_dir, tokenizer_path):
    case = build_case(name, tmp_path, tiny_config_dir, tokenizer_path)
    log_dir = str(tmp_path / "torchrun-logs")
    res = run_train(
        case.args, nproc=2, timeout=120, extra_env=case.env, torchrun_args=["--log-dir", log_dir, "--redirects", "3"]
    )
    assert res.returncode != 0, res.output
    (out0, err0), (out1, err1) = worker_logs(log_dir, 0), worker_logs(log_dir, 1)
    for rank, text in enumerate((out0 + err0, out1 + err1)):
        assert "Traceback" not in text, f"rank {rank} printed a traceback:\n{text}"
    check_error_line(err0, case)
    assert not any("error" in line.lower() for line in lines(out0)), out0
    # Every rank meets the same error, but only rank 0 reports it.
    assert not any(line.startswith("error") for line in lines(out1 + err1)), f"rank 1 printed:\n{out1}{err1}"


@pytest.mark.parametrize("name", CASES)
def test_bad_input_in_one_process(name, tmp_path, tiny_config_dir, tokenizer_path, capfd, monkeypatch):
    """What `python train_ddp.py` does with the case (the same main, a world of one), in this process."""
    import train_ddp

    case = build_case(name, tmp_path, tiny_config_dir, tokenizer_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    code = train_ddp.main(case.args)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    assert code == 2, f"exit {code}\n{out}{err}"
    check_error_line(err, case)
    assert not lines(out), out


# Under torchrun a rank that would hang is killed by the launcher once another rank fails, so the test above
# cannot see it. Here the two ranks are started by hand, with the variables torchrun sets, and each one must
# exit by itself, non-zero and quietly, within the limit. The first case fails before torch is imported
# (mlm.config.answer_user_errors_first); the others after the process group exists, on rank 0 alone (blank
# file) or on every rank (positions).
@pytest.mark.parametrize("name", ["missing_train_file", "blank_train_file", "max_seq_length_beyond_positions"])
def test_every_rank_exits_by_itself(name, tmp_path, tiny_config_dir, tokenizer_path):
    case = build_case(name, tmp_path, tiny_config_dir, tokenizer_path)
    results = wait_all(start_ranks(case.args, nproc=2, extra_env=case.env), timeout=TIME_LIMIT_S)
    for rank, r in enumerate(results):
        assert r.returncode != 0 and "Traceback" not in r.output, f"rank {rank} exit {r.returncode}:\n{r.output}"
    assert results[0].returncode == 2
    check_error_line(results[0].stderr, case)
    assert not lines(results[1].output), f"rank 1 printed:\n{results[1].output}"


GRACE_SCRIPT = """
import sys
import time
from mlm.common import workers
from mlm.common.cli import UserError
workers.USER_ERROR_GRACE_S = 600.0
real_sleep = time.sleep


def sleep(seconds):
    print("waiting", flush=True)  # the grace has begun: its handler is in place
    real_sleep(seconds)


time.sleep = sleep
print("exit", workers.report_user_error(UserError("bad option"), rank=1), flush=True)
"""


def test_a_quiet_rank_leaves_its_grace_when_torchrun_stops_it(tmp_path):
    """A rank other than 0 that meets a user error stays quiet and waits for rank 0 to print it; torchrun's
    SIGTERM (sent once rank 0 has exited) ends the wait at once, with the user-error exit code, not a signal."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "grace.py"
    script.write_text(GRACE_SCRIPT)
    env = _env({"RANK": "1", "WORLD_SIZE": "2"})
    p = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert p.stdout.readline().strip() == "waiting"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)  # far below the 600 s grace: the signal ended the wait
    finally:
        p.kill()
    assert p.returncode == 0 and out.strip() == "exit 2", out


@pytest.mark.parametrize(
    "raised, user_error",
    [
        (OSError("bert-x is not a local folder and is not a valid model identifier"), True),
        (ValueError("Unrecognized model in /tmp/m. Should have a `model_type` key in its config.json"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (TypeError("__init__() got an unexpected keyword argument 'x'"), False),  # a bug of ours keeps its type
    ],
)
def test_only_a_failure_to_load_becomes_could_not_load(raised, user_error, monkeypatch, tokenizer):
    """from_pretrained's loading errors are one line; an out-of-memory or a bug is not reported as one."""
    import transformers

    from mlm.config import TrainConfig
    from mlm.model import modeling

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", fail)
    cfg = TrainConfig(model_name_or_path="bert-x")
    with pytest.raises(UserError if user_error else type(raised)) as caught:
        modeling.build_model(cfg, transformers.BertConfig(), tokenizer)
    assert ("could not load the model 'bert-x'" in str(caught.value)) is user_error
