"""The run directory under bad luck, in this process: a disk that fills up during a write (every kind of file a
run writes) and the one-writer lock (invariant 9). The same under torchrun with 2 ranks, a real full tmpfs and a
second launch: tests/test_resilience.py."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import make_text_file, read_json, tiny_args, train_here

from mlm.common import files, processes
from mlm.common.cli import UserError
from mlm.train import checkpoint, runlock

EXIT_DISK_FULL = 4
TORCH_SAVE_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save, full disk
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


# ---------------------------------------------------------------------- disk full
@pytest.mark.parametrize(
    "exc, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (RuntimeError(TORCH_SAVE_FULL), True),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            ),
            True,
        ),
        (Exception(SAFETENSORS_FULL), True),  # safetensors' own exception class, by its text
        (OSError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("unexpected value"), False),
    ],
)
def test_a_full_disk_is_recognised_in_every_form_a_writer_raises_it(exc, full):
    assert files.is_disk_full(exc) is full
    try:  # and when it is the cause of another exception
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        assert files.is_disk_full(outer) is full


def _fail_on(monkeypatch, module, name: str, exc: BaseException, after: int = 0):
    """module.name raises exc from its (after + 1)-th call on, having written part of its file first."""
    original, calls = getattr(module, name), {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            path = str(args[1]) if len(args) > 1 else str(kwargs.get("f", ""))
            if path and os.path.isdir(os.path.dirname(path)):
                with open(path, "wb") as fh:
                    fh.write(b"half a file")
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.fixture
def disk_run(tmp_path, tiny_config_dir, tokenizer_path):
    train = make_text_file(str(tmp_path / "t.txt"), n_lines=150, seed=6)
    out = str(tmp_path / "out")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=train,
        max_train_steps=6,
        eval_steps=2,
        save_steps=2,
        save_total_limit=5,
        eval_on_start="false",
    )
    return out, args


@pytest.mark.parametrize(
    "where",
    ["checkpoint (torch.save)", "checkpoint (safetensors)", "best/ export", "training history", "run_config.json"],
)
def test_a_disk_that_fills_up_ends_the_run_with_one_line_and_damages_nothing(where, disk_run, monkeypatch, capsys):
    out, args = disk_run
    import safetensors.torch

    if where == "checkpoint (torch.save)":  # the second checkpoint (step 4)
        _fail_on(monkeypatch, checkpoint.torch, "save", RuntimeError(TORCH_SAVE_FULL), after=5)
    elif where == "checkpoint (safetensors)":
        _fail_on(monkeypatch, safetensors.torch, "save_model", Exception(SAFETENSORS_FULL), after=1)
    elif where == "best/ export":  # save_pretrained's safetensors file of the second best/ (step 4)
        import transformers.modeling_utils

        _fail_on(
            monkeypatch,
            transformers.modeling_utils,
            "safe_save_file",
            OSError(errno.ENOSPC, "No space left on device"),
            after=1,
        )
    elif where == "training history":  # the step-4 log's entry, written, then found not to fit when flushed
        original_dumps, original_fsync, appending = files.json.dumps, files.os.fsync, []

        def dumps(obj, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == 4 and "loss" in obj:
                appending.append(obj)
            return original_dumps(obj, *a, **k)

        def fsync(fd):
            if appending:
                appending.clear()
                raise OSError(errno.ENOSPC, "No space left on device")
            return original_fsync(fd)

        monkeypatch.setattr(files.json, "dumps", dumps)
        monkeypatch.setattr(files.os, "fsync", fsync)
    else:
        original = files.json.dump

        def dump(obj, fh, *a, **k):
            if isinstance(obj, dict) and "precision_resolved" in obj:
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            return original(obj, fh, *a, **k)

        monkeypatch.setattr(files.json, "dump", dump)
    capsys.readouterr()
    assert train_here(args) == EXIT_DISK_FULL
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert f"no space left on the disk of {out}" in line and "GiB free" in line, line
    assert "Free space and run the same command to resume" in line, line
    # Nothing half-written is left, and what was saved before is intact.
    leftovers = [os.path.join(d, n) for d, ds, fs in os.walk(out) for n in ds + fs if ".tmp" in n]
    assert leftovers == [], leftovers
    saved = checkpoint.checkpoint_dirs(out)
    if where == "run_config.json":
        assert saved == [] and "the newest intact checkpoint is none yet" in line
        return
    assert [s for s, _ in saved] == [2]  # every failure is at step 4, before (or during) its checkpoint
    assert all(checkpoint.is_complete(p, verify_hashes=True) for _, p in saved)
    assert f"newest intact checkpoint is {saved[-1][1]}" in line
    if where != "best/ export":
        assert read_json(os.path.join(out, "best", "eval_results.json"))["step"] in (2, 4)
    else:
        assert read_json(os.path.join(out, "best", "eval_results.json"))["step"] == 2  # the old best, whole
    history = read_json(os.path.join(out, "training_history.json"))
    assert max(h["step"] for h in history) == (3 if where == "training history" else 4)


def test_a_checkpoint_interrupted_by_a_full_disk_leaves_no_temporary_directory(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    state = checkpoint.TrainState(step=1)
    checkpoint.save_checkpoint(str(tmp_path), state, model, {}, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _fail_on(monkeypatch, checkpoint.torch, "save", RuntimeError(TORCH_SAVE_FULL))
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(str(tmp_path), checkpoint.TrainState(step=2), model, {"optimizer": optimizer}, 3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]
    assert checkpoint.is_complete(str(tmp_path / "checkpoints" / "step-1"), verify_hashes=True)
    files.write_json_atomic(str(tmp_path / "h.json"), [1])
    monkeypatch.setattr(files.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        files.write_json_atomic(str(tmp_path / "h.json"), [1, 2])
    assert read_json(str(tmp_path / "h.json")) == [1] and not os.path.exists(tmp_path / "h.json.tmp")


# ---------------------------------------------------------------------- one writer
def _lock(directory, **fields) -> str:
    """A run.lock as another run would have left it."""
    holder = {
        "host": socket.gethostname(),
        "pid": 1,
        "pid_start": None,
        "started": time.time() - 60,
        "command": "train_ddp.py --other",
        "job": None,
        "attempt": 0,
        "token": "theirs",
        **fields,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, runlock.LOCK_FILE)
    with open(path, "w") as fh:
        json.dump(holder, fh)
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_lock_names_its_holder_and_a_second_acquire_refuses(tmp_path):
    lock = runlock.acquire(str(tmp_path / "run"))
    try:
        held = read_json(str(tmp_path / "run" / runlock.LOCK_FILE))
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["started"] > 0
        with pytest.raises(
            UserError,
            match=rf"is in use by a live run \(host .*, pid {os.getpid()}, started .*\); wait for "
            r"it to finish, or give this run another --output_dir",
        ):
            runlock.acquire(str(tmp_path / "run"))
        lock.check()  # still ours
    finally:
        lock.release()
    assert not os.path.exists(tmp_path / "run" / runlock.LOCK_FILE)
    runlock.acquire(str(tmp_path / "run")).release()  # free again


@pytest.mark.parametrize(
    "case", ["dead pid", "reused pid", "zombie", "earlier torchrun attempt", "other host, silent for long", "torn file"]
)
def test_a_lock_left_by_a_dead_run_is_taken_over_at_once(case, tmp_path, monkeypatch, caplog):
    run = str(tmp_path / "run")
    zombie = None
    if case == "dead pid":
        path = _lock(run, pid=_dead_pid())
    elif case == "reused pid":  # a live pid, but not the process that took the lock
        path = _lock(run, pid=os.getpid(), pid_start=1)
    elif case == "zombie":  # killed, not yet reaped by its parent
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        while processes.process_start(zombie.pid)[0] != "Z":
            time.sleep(0.01)
        path = _lock(run, pid=zombie.pid)
    elif case == "earlier torchrun attempt":  # same job, restarted by torchrun: even a live pid is taken over
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        path = _lock(run, pid=os.getpid(), job="job-7", attempt=0)
    elif case == "other host, silent for long":
        path = _lock(run, host="another-node")
        os.utime(path, (time.time() - 10 * runlock.STALE_AFTER_S,) * 2)
    else:
        path = os.path.join(run, runlock.LOCK_FILE)
        os.makedirs(run)
        with open(path, "w") as fh:
            fh.write('{"host": "a-node", "pi')
    lock = runlock.acquire(run)
    try:
        assert "watching its heartbeat" not in caplog.text  # decided at once, without waiting on the holder
        assert read_json(path)["pid"] == os.getpid()
        assert "taking over" in caplog.text
    finally:
        lock.release()
        if zombie:
            zombie.wait()


def test_a_lock_of_another_node_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """A holder elsewhere touches the file every HEARTBEAT_S: a touch within STALE_AFTER_S means alive."""
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 3.0)
    run = str(tmp_path / "run")
    path = _lock(run, host="another-node")
    stop = threading.Event()

    def beat():
        while not stop.wait(0.5):
            os.utime(path)

    # What the lock decided, counted in the looks it took at the file (one a second), not in this machine's time.
    looks: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(runlock.time, "sleep", lambda s: (looks.append(s), real_sleep(s))[1])
    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(UserError, match="in use by a live run .*host another-node"):
            runlock.acquire(run)
        assert len(looks) <= 2, looks  # refused at the first heartbeat seen, not after the whole wait
    finally:
        stop.set()
        t.join()
    # The same holder, silent from now on: taken over once STALE_AFTER_S has passed without a heartbeat.
    looks.clear()
    lock = runlock.acquire(run)
    lock.release()
    assert sum(looks) >= runlock.STALE_AFTER_S - 1.0, looks  # it watched the whole window before taking over


def test_a_run_whose_lock_was_taken_over_stops_before_writing(tmp_path):
    run = str(tmp_path / "run")
    lock = runlock.acquire(run)
    _lock(run, host="another-node", token="newer")  # another node took it over while this run was frozen
    with pytest.raises(UserError, match="was taken over by host another-node"):
        lock.check()
    lock.release()
    assert read_json(os.path.join(run, runlock.LOCK_FILE))["token"] == "newer"  # release leaves theirs alone


def test_the_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    lock = runlock.acquire(str(tmp_path / "run"))
    try:
        first = os.stat(lock.path).st_mtime_ns
        time.sleep(0.6)
        assert os.stat(lock.path).st_mtime_ns > first
    finally:
        lock.release()


# ---------------------------------------------------------------------- --overwrite_output_dir deletes no input
def _tree(root: str) -> dict[str, str]:
    """Every file under root -> its SHA-256: what a refused run must leave exactly as it was."""
    return {
        os.path.relpath(os.path.join(d, n), root): files.sha256_file(os.path.join(d, n))
        for d, _, names in os.walk(root)
        for n in names
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config_dir, tokenizer_path):
    """A finished tiny run's directory (best/ and checkpoints/step-2, step-4), copied afresh for each test."""
    root = tmp_path_factory.mktemp("finished")
    train = make_text_file(str(root / "t.txt"), n_lines=150, seed=6)
    out = str(root / "out")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(root / "cache"),
        train_file=train,
        max_train_steps=4,
        eval_steps=2,
        save_steps=2,
        eval_on_start="false",
    )
    assert train_here(args) == 0
    return out, args


@pytest.fixture
def run_dir(finished_run, tmp_path):
    import shutil

    out, args = finished_run
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    return copy, [copy if a == out else a for a in args]


def _set(args: list[str], **kw) -> list[str]:
    """args with each --key's value replaced (or appended)."""
    args = list(args)
    for k, v in kw.items():
        flag = f"--{k}"
        if flag in args:
            args[args.index(flag) + 1] = v
        else:
            args += [flag, v]
    return args


@pytest.mark.parametrize(
    "flag, inside",
    [
        ("model_name_or_path", "best"),  # fine-tune further from the run's own best model, into the same directory
        ("config_name", "best"),
        ("tokenizer_name", "best"),
        ("train_file", "best/notes.txt"),
        ("validation_file", "checkpoints/notes.txt"),
        ("test_file", "training_history.json"),
        ("resume_from_checkpoint", "checkpoints/step-2"),
    ],
)
def test_overwrite_refuses_before_deleting_a_path_the_run_reads(flag, inside, run_dir, capsys):
    out, args = run_dir
    path = os.path.join(out, inside)
    if inside.endswith("notes.txt"):
        make_text_file(path, n_lines=50)
    if flag == "test_file":  # a .json the run reads as text: the history itself
        path = os.path.join(out, "training_history.json")
    before = _tree(out)
    if flag == "model_name_or_path":
        args = _set(args, config_name="", tokenizer_name="")
        args = [a for i, a in enumerate(args) if a not in ("--config_name", "--tokenizer_name", "")]
    capsys.readouterr()
    assert train_here(_set(args, **{flag: path, "overwrite_output_dir": "true"})) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"--{flag} {path!r} is inside --output_dir" in lines[0] and "choose another --output_dir" in lines[0]
    assert _tree(out) == before  # nothing deleted, nothing written


def test_overwrite_removes_what_runs_wrote_and_keeps_a_users_own_files(run_dir):
    out, args = run_dir
    notes = {
        name: os.path.join(out, name)
        for name in ("notes.md", "best/notes.md", "checkpoints/notes.md", "checkpoints/step-notes")
    }
    for path in notes.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path.endswith("step-notes"):
            os.makedirs(path)
            path = os.path.join(path, "a.txt")
        with open(path, "w") as fh:
            fh.write("mine\n")
    old_history = read_json(os.path.join(out, "training_history.json"))
    written = files.run_written_paths(out)
    names = {os.path.relpath(p, out) for p in written}
    assert {
        "training_history.json",
        "run_config.json",
        "checkpoints/step-2",
        "checkpoints/step-4",
        "best/model.safetensors",
        "best/config.json",
        "best/eval_results.json",
        "best/README.md",
    } <= names
    assert not any("notes" in n for n in names), names
    files.clear_run_dir(out)
    assert not any(os.path.exists(p) for p in written)
    assert all(os.path.exists(p) for p in notes.values())
    # And through a run: it starts afresh (no resume), and the user's files are still there afterwards.
    assert train_here(_set(args, overwrite_output_dir="true", max_train_steps="2")) == 0
    assert all(os.path.exists(p) for p in notes.values())
    history = read_json(os.path.join(out, "training_history.json"))
    assert max(h["step"] for h in history) == 2 and history != old_history
    assert [s for s, _ in checkpoint.checkpoint_dirs(out)] == [2]


@pytest.mark.parametrize(
    "names",
    [
        ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],  # WordPiece
        ["vocab.json", "merges.txt", "added_tokens.json"],  # byte-level BPE
        ["spm.model", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"],  # SentencePiece kinds
        [
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "chat_template.jinja",
            "generation_config.json",
            "test_results.json",
        ],
    ],
)
def test_every_kind_of_export_file_counts_as_written_by_a_run(names, tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    for name in names + ["my_vocab_notes.txt", "config.json.bak"]:
        (best / name).write_text("x")
    assert sorted(os.path.basename(p) for p in files.run_written_paths(str(tmp_path))) == sorted(names)


# ---------------------------------------------------------------------- a resume refuses what it cannot compare
@pytest.mark.parametrize(
    "change, what",
    [
        ({"max_seq_length": "24"}, "its --max_seq_length was 32, this run's is 24"),
        ({"validation_split_percentage": "10"}, "its evaluation data was "),
        ({"mlm_probability": "0.3"}, "its evaluation masking was --mlm_probability 0.15"),
        ({"eval_mlm_probability": "0.3"}, "its evaluation masking was --mlm_probability 0.15, --mask_replace"),
        ({"config_name": "{deeper}"}, "its model architecture was model_type bert, num_hidden_layers 2"),
    ],
)
def test_a_resume_refuses_a_change_it_cannot_compare(change, what, run_dir, tmp_path, capsys):
    from helpers import TINY_BERT, write_tiny_config

    out, args = run_dir
    deeper = write_tiny_config(str(tmp_path / "deeper"), **{**TINY_BERT, "num_hidden_layers": 3})
    before = _tree(out)
    capsys.readouterr()
    change = {k: v.replace("{deeper}", deeper) for k, v in change.items()}
    assert train_here(_set(args, **change)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot resume {os.path.join(out, 'checkpoints', 'step-4')}: {what}" in lines[0], lines[0]
    assert "resume with the checkpoint's settings, or start a new run with another --output_dir" in lines[0]
    assert _tree(out) == before


def test_a_resume_may_train_at_another_rate_when_evaluation_keeps_its_masks(run_dir, capsys):
    out, args = run_dir
    capsys.readouterr()
    assert train_here(_set(args, mlm_probability="0.3", eval_mlm_probability="0.15", max_train_steps="5")) == 0
    assert "resuming from" in capsys.readouterr().out


def test_a_resume_takes_what_may_change_and_says_so(run_dir, capsys):
    out, args = run_dir
    capsys.readouterr()
    assert train_here(_set(args, per_device_train_batch_size="2", max_train_steps="5")) == 0
    printed = capsys.readouterr().out
    assert "changed since checkpoint" in printed and "global batch 4 kept" in printed


def test_the_card_never_says_best_at_a_step_beyond_the_run(run_dir):
    """Resumed at step 4 with --max_train_steps 2: the run has nothing left to train, and its card counts the
    steps trained (it said "best at step 4 of 2")."""
    out, args = run_dir
    assert train_here(_set(args, max_train_steps="2")) == 0
    card = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    step = read_json(os.path.join(out, "best", "eval_results.json"))["step"]
    assert f"best at step {step} of 4 " in card, [line for line in card.splitlines() if "best at step" in line]
