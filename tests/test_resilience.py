"""Never lose work (invariants 4, 5, 6 of docs/DESIGN.md): exact resume, SIGTERM, SIGKILL with torchrun restarts,
a crash while
saving, an exception on one rank, a loss that stays non-finite. Faults come from tests/faulty_train.py; every
run is a subprocess with a timeout, so a hang fails instead of blocking."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import TINY_BERT, read_json, run_train, small_corpus, start_ranks, tiny_args, wait_all, write_tiny_config
from test_ddp import load_weights, max_abs_diff

STEPS = 12
EXIT_NONFINITE, EXIT_DISK_FULL, EXIT_OUT_OF_TIME, EXIT_SIGTERM = 3, 4, 5, 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resilience")
    # Dropout on: the per-rank RNG states must be restored too for a resumed run to match.
    config = write_tiny_config(
        str(d / "cfg"), **{**TINY_BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    )
    return {"config": config, **small_corpus(d)}


def args_for(setup, out: str, tokenizer_path, **kw) -> list[str]:
    opts = {
        **dict(
            train_file=setup["train"],
            validation_file=setup["valid"],
            max_train_steps=STEPS,
            save_steps=4,
            save_total_limit=10,
            eval_steps=6,
            gradient_accumulation_steps=2,
            seed=3,
        ),
        **kw,
    }
    return tiny_args(setup["config"], str(tokenizer_path), out, setup["cache"], **opts)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory, tokenizer_path) -> str:
    """The uninterrupted run every interrupted one must end equal to."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    r = run_train(args_for(setup, out, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    return out


def train_history(run_dir: str) -> list[dict]:
    return [h for h in read_json(os.path.join(run_dir, "training_history.json")) if "loss" in h]


def assert_same_run(run_dir: str, reference: str, resumed_at: int) -> None:
    """Same final weights, the same history after the resume point, no duplicated step, the same final LR."""
    assert max_abs_diff(load_weights(run_dir, STEPS), load_weights(reference, STEPS)) <= 1e-6
    got, want = train_history(run_dir), train_history(reference)
    assert [h["step"] for h in got] == list(range(1, STEPS + 1)), [h["step"] for h in got]
    for g, w in zip(got[resumed_at:], want[resumed_at:]):
        for key in ("loss", "loss_max", "grad_norm", "lr", "epoch"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), (g["step"], key, g[key], w[key])
    assert got[-1]["lr"] == want[-1]["lr"]
    evals = lambda d: [
        (h["step"], round(h["eval"]["loss"], 6))
        for h in read_json(os.path.join(d, "training_history.json"))
        if "eval" in h
    ]
    assert evals(run_dir) == evals(reference)


def wait_for_step(run_dir: str, step: int, procs, timeout: float = 120) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if train_history(run_dir) and train_history(run_dir)[-1]["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            try:
                out, err = ended[0].communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = "", "(its output is held open by a process it started)"
            raise AssertionError(
                f"a rank ended before the signal, with {ended[0].returncode}:\n{((out or '') + (err or ''))[-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def resume_and_compare(setup, reference: str, out: str, tokenizer_path) -> None:
    """The stop left one checkpoint mid-run; relaunched, the run resumes there and ends as the reference."""
    step = max(int(s.split("-")[1]) for s in os.listdir(os.path.join(out, "checkpoints")))
    assert 3 <= step < STEPS, step
    r = run_train(args_for(setup, out, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert f"step {step})" in r.output
    assert_same_run(out, reference, step)


def test_uninterrupted_reference_is_a_real_comparison(reference):
    """Resuming from step 4 with the wrong state would differ: the equality checks below can fail."""
    state = read_json(os.path.join(reference, "checkpoints", "step-4", "trainer_state.json"))
    assert state["epoch"] == 0 and 0 < state["micro_in_epoch"]  # step 4 is mid-epoch, with accumulation 2
    assert max_abs_diff(load_weights(reference, 4), load_weights(reference, STEPS)) > 1e-4


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_resumes_exactly(
    setup, reference, tmp_path, tokenizer_path
):
    out = str(tmp_path / "run")
    procs = start_ranks(args_for(setup, out, tokenizer_path), fault={"sleep": 0.3})
    wait_for_step(out, 3, procs)
    t_signal = time.perf_counter()
    procs[1].send_signal(signal.SIGTERM)
    results = wait_all(procs, timeout=60)
    seconds = time.perf_counter() - t_signal
    for rank, r in enumerate(results):
        assert r.returncode == EXIT_SIGTERM, f"rank {rank} exit {r.returncode}:\n{r.output[-3000:]}"
        assert "Traceback" not in r.output, r.output
    assert "stopped by SIGTERM" in results[0].stderr and "Run the same command again" in results[0].stderr
    print(f"SIGTERM to exit of both ranks: {seconds:.2f} s")
    resume_and_compare(setup, reference, out, tokenizer_path)


def test_sigterm_to_torchrun_saves_and_resumes_exactly(setup, reference, tmp_path, tokenizer_path):
    """The usual preemption: the platform signals the launcher, which forwards SIGTERM to every worker."""
    import json

    from helpers import ROOT, start, torchrun_command

    out = str(tmp_path / "run")
    script = os.path.join(ROOT, "tests", "faulty_train.py")
    p = start(
        torchrun_command(2, script, args_for(setup, out, tokenizer_path)), {"MLM_FAULT": json.dumps({"sleep": 0.3})}
    )
    try:
        wait_for_step(out, 3, [p])
        p.send_signal(signal.SIGTERM)
        output = "".join(p.communicate(timeout=60))
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0  # torchrun reports the signal it got
    assert "stopped by SIGTERM" in output and "exit code 143" in output, output[-3000:]
    resume_and_compare(setup, reference, out, tokenizer_path)


def test_sigkill_under_torchrun_restarts_and_completes_exactly(setup, reference, tmp_path, tokenizer_path):
    """Rank 0, the holder of the run directory's lock, is killed: the restarted group takes the lock over."""
    out = str(tmp_path / "run")
    marker = str(tmp_path / "fired")
    # One restart is all it may take. (Before init_distributed prefixed the store per attempt, the restarted
    # group could read the dead attempt's peer addresses and fail or hang connecting, under load.)
    r = run_train(
        args_for(setup, out, tokenizer_path),
        nproc=2,
        torchrun_args=["--max-restarts=1"],
        fault={"kind": "sigkill", "rank": 0, "step": 6, "marker": marker},
        timeout=300,
    )
    assert r.returncode == 0, r.output[-4000:]
    assert open(marker).read().count("sigkill 0") == 1  # the worker really was killed, once
    assert "taking over" in r.output and "run.lock" in r.output
    assert "resuming from" in r.output and "step 4)" in r.output
    assert_same_run(out, reference, 4)
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released at the end


def test_a_second_launch_into_a_live_run_refuses_and_the_first_is_unaffected(
    setup, reference, tmp_path, tokenizer_path
):
    out = str(tmp_path / "run")
    first = start_ranks(args_for(setup, out, tokenizer_path), fault={"sleep": 1.5})  # still training meanwhile
    try:
        wait_for_step(out, 1, first)
        second = wait_all(start_ranks(args_for(setup, out, tokenizer_path)), timeout=60)
        for rank, r in enumerate(second):
            assert r.returncode == 2 and "Traceback" not in r.output, f"rank {rank} exit {r.returncode}:\n{r.output}"
        errors = [line for line in second[0].stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is in use by a live run (host" in errors[0], second[0].stderr
        assert f"pid {first[0].pid}" in errors[0] and "another --output_dir" in errors[0]
        assert not second[1].stderr.strip(), second[1].stderr
        assert all(p.poll() is None for p in first)  # still training
    finally:
        results = wait_all(first, timeout=120)
    assert all(r.returncode == 0 for r in results), [r.output[-2000:] for r in results]
    assert_same_run(out, reference, 0)


def test_a_relaunch_after_the_lock_holder_was_killed_takes_over(setup, reference, tmp_path, tokenizer_path):
    out = str(tmp_path / "run")
    procs = start_ranks(args_for(setup, out, tokenizer_path), fault={"sleep": 0.3})
    wait_for_step(out, 5, procs)
    procs[0].send_signal(signal.SIGKILL)  # rank 0 holds run.lock; kill -9 leaves it behind
    wait_all(procs, timeout=60)
    assert os.path.exists(os.path.join(out, "run.lock"))
    step = max(int(s.split("-")[1]) for s in os.listdir(os.path.join(out, "checkpoints")))
    r = run_train(args_for(setup, out, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "taking over" in r.output and f"step {step})" in r.output
    assert_same_run(out, reference, step)


def test_a_disk_that_fills_up_mid_run_stops_every_rank_and_the_resume_is_exact(setup, tmp_path, tokenizer_path):
    """output_dir on a tmpfs with room for the step-4 checkpoint and best/, not for step 8's checkpoint. The model
    is wider than the other tests' so that a checkpoint outweighs the 64 MiB any run needs free to start."""
    from test_ddp import load_weights

    from mlm.train.checkpoint import checkpoint_bytes, is_complete

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    wide = {
        **setup,
        "config": write_tiny_config(
            str(tmp_path / "wide"),
            **{
                **TINY_BERT,
                "hidden_size": 128,
                "intermediate_size": 256,
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
            },
        ),
    }
    reference = str(tmp_path / "reference")
    r = run_train(args_for(wide, reference, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    size = lambda d: sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)
    step4, best = size(os.path.join(reference, "checkpoints", "step-4")), size(os.path.join(reference, "best"))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(sum(t.numel() for t in load_weights(reference, 4).values())))
    start_check = max(int(checkpoint_bytes(model) * 1.2), 64 * 2**20) + 2**20  # what a run checks at start
    room = max(start_check, step4 + best + step4 // 2)
    assert room < 2 * step4 + best, "the tmpfs would hold the step-8 checkpoint too: the test would not fill it"
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {mounted.stderr.strip()}")
    try:
        out = str(disk / "run")
        results = wait_all(start_ranks(args_for(wide, out, tokenizer_path)), timeout=120)
        for rank, r in enumerate(results):
            assert r.returncode == EXIT_DISK_FULL and "Traceback" not in r.output, (
                f"rank {rank} exit {r.returncode}:\n{r.output[-3000:]}"
            )
        errors = [line for line in results[0].stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, results[0].stderr
        assert f"no space left on the disk of {out}" in errors[0] and "GiB free" in errors[0]
        assert "newest intact checkpoint is" in errors[0] and "step-4" in errors[0]
        assert "Free space and run the same command to resume" in errors[0]
        assert not results[1].stderr.strip(), results[1].stderr
        assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-4"]  # no .tmp-step-8 left
        assert is_complete(os.path.join(out, "checkpoints", "step-4"), verify_hashes=True)
        assert read_json(os.path.join(out, "best", "eval_results.json"))["step"] == 6
        bigger = str(tmp_path / "bigger" / "run")
        shutil.copytree(out, bigger)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    r = run_train(args_for(wide, bigger, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "step 4)" in r.output
    assert_same_run(bigger, reference, 4)


def test_crash_during_a_save_leaves_the_previous_checkpoint(setup, reference, tmp_path, tokenizer_path):
    out = str(tmp_path / "run")
    r = run_train(
        args_for(setup, out, tokenizer_path), nproc=2, fault={"kind": "save_crash", "rank": 0, "step": 8}, timeout=300
    )
    assert r.returncode != 0
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == [".tmp-step-8", "step-4"]  # the torn save never became step-8
    r = run_train(args_for(setup, out, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "removing" in r.output and ".tmp-step-8" in r.output and "unfinished save" in r.output
    assert "step 4)" in r.output
    assert_same_run(out, reference, 4)


def test_auto_resume_skips_a_damaged_checkpoint_with_a_warning(reference, tmp_path, caplog):
    from mlm.train.checkpoint import choose_resume

    out = str(tmp_path / "copy")
    shutil.copytree(reference, out)
    weights = os.path.join(out, "checkpoints", f"step-{STEPS}", "model.safetensors")
    with open(weights, "r+b") as fh:  # same size, different bytes: only the hash can tell
        fh.seek(os.path.getsize(weights) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="mlm"):
        chosen = choose_resume(out, "auto", overwrite=False)
    assert chosen == os.path.join(out, "checkpoints", "step-8")
    assert f"step-{STEPS}" in caplog.text and "damaged" in caplog.text


def test_an_exception_on_one_rank_ends_every_rank(setup, tmp_path, tokenizer_path):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "fired")
    procs = start_ranks(
        args_for(setup, out, tokenizer_path), fault={"kind": "raise", "rank": 1, "step": 3, "marker": marker}
    )
    results = wait_all(procs, timeout=90)
    ended = time.time()
    fired = float(open(marker).read().split()[2])
    print(f"exception on rank 1 to exit of both ranks: {ended - fired:.2f} s")  # wait_all's timeout fails a hang
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    # Rank 0 stopped with the failure instead of training on: no later step was saved.
    saved = os.listdir(os.path.join(out, "checkpoints")) if os.path.isdir(os.path.join(out, "checkpoints")) else []
    assert f"step-{STEPS}" not in saved, saved
    # The error is told once, by the rank that had it; the other rank ends quietly.
    assert results[1].output.count("injected failure on rank 1") == 1, results[1].output
    assert "Traceback" not in results[0].output and "injected failure" not in results[0].output, results[0].output


def test_a_loss_that_stays_nan_stops_every_rank_and_keeps_best(setup, tmp_path, tokenizer_path):
    out = str(tmp_path / "run")
    procs = start_ranks(
        args_for(setup, out, tokenizer_path, eval_steps=3, save_steps=3, max_nonfinite_steps=3),
        fault={"kind": "nan", "rank": 1, "step": 4},
    )  # rank 1 only: DDP spreads it
    results = wait_all(procs, timeout=120)
    for rank, r in enumerate(results):
        assert r.returncode == EXIT_NONFINITE, f"rank {rank} exit {r.returncode}:\n{r.output[-3000:]}"
        assert "Traceback" not in r.output
    assert "training stopped at step 6" in results[0].stderr and "3 consecutive steps" in results[0].stderr
    assert not results[1].stderr.strip(), results[1].stderr
    history = train_history(out)
    assert history[-1]["step"] == 6 and history[-1]["skipped_steps"] >= 1
    assert all(h["skipped_steps"] == 0 for h in history[:3])
    # Nothing saved after the loss went bad; best/ is the step-3 model and the weights are finite.
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-3"]
    assert read_json(os.path.join(out, "best", "eval_results.json"))["step"] == 3
    from safetensors.torch import load_file

    best = load_file(os.path.join(out, "best", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in best.values())
    ckpt = load_weights(out, 3)
    assert max(abs(best[k] - ckpt[k]).max().item() for k in best if k in ckpt) == 0.0


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_with_nonfinite_gradients_changes_nothing(fused):
    """bf16/fp32 have no GradScaler to skip a bad step: skip_nonfinite_step must (fused: on the device)."""
    from mlm.train.engine import skip_nonfinite_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else False)
    for bad in (False, True, False):
        before = [p.detach().clone() for p in model.parameters()]
        steps = [opt.state[p]["step"].item() if p in opt.state else 0 for p in model.parameters()]
        model(torch.randn(2, 4)).sum().backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        skip_nonfinite_step(opt, ~torch.isfinite(norm))
        opt.zero_grad()
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert changed != bad
        assert all(torch.isfinite(p).all() for p in model.parameters())
        after = [opt.state[p]["step"].item() for p in model.parameters()]
        assert after == [s + (0 if bad else 1) for s in steps]  # a skipped step is not counted by AdamW


def test_too_little_disk_for_a_checkpoint_is_an_error_before_training(tmp_path, monkeypatch):
    from collections import namedtuple

    from mlm.config import UserError
    from mlm.train import checkpoint

    model = torch.nn.Linear(1000, 1000)  # 1M parameters: a checkpoint needs about 16 MB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**12, 0, 10 * 2**20))
    with pytest.raises(UserError, match="GiB free on its disk.*one checkpoint of this model needs"):
        checkpoint.check_free_space(str(tmp_path / "not-yet-created" / "run"), model)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**12, 0, 100 * 2**20))
    checkpoint.check_free_space(str(tmp_path / "not-yet-created" / "run"), model)


def test_no_secret_reaches_disk_or_logs(setup, tmp_path, tokenizer_path):
    secret = "sentinel-secret-7f3a9c"
    out = str(tmp_path / "run")
    r = run_train(
        args_for(setup, out, tokenizer_path, max_train_steps=2, report_to="all"),
        nproc=2,
        extra_env={"WANDB_API_KEY": secret, "HF_TOKEN": secret, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.output[-3000:]
    assert secret not in r.output
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert any("wandb" in f for f in files) and any(f.endswith("run_config.json") for f in files)
    for path in files:
        with open(path, "rb") as fh:
            assert secret.encode() not in fh.read(), path


def test_a_time_budget_stops_every_rank_with_a_checkpoint_and_the_resume_is_exact(
    setup, reference, tmp_path, tokenizer_path
):
    """--max_runtime 14 s with 1.5 s steps: the run stops at a step boundary (exit code 5 on every rank) with its
    checkpoint on disk before the budget ends, and the same command without a budget finishes it exactly. (With
    1 s steps a fast start fitted all 12 steps in the budget: the 12 steps now need 18 s.)"""
    out = str(tmp_path / "run")
    results = wait_all(
        start_ranks(args_for(setup, out, tokenizer_path, max_runtime="14"), fault={"sleep": 1.5}), timeout=120
    )
    for rank, r in enumerate(results):
        assert r.returncode == EXIT_OUT_OF_TIME and "Traceback" not in r.output, (
            f"rank {rank} exit {r.returncode}:\n{r.output[-3000:]}"
        )
    errors = [line for line in results[0].stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "the --max_runtime 14 budget leaves no time for another step" in errors[0]
    assert "Run the same command again to resume (exit code 5)" in errors[0]
    assert not results[1].stderr.strip(), results[1].stderr
    step = max(int(s.split("-")[1]) for s in os.listdir(os.path.join(out, "checkpoints")))
    assert 1 <= step < STEPS and f"saving a checkpoint at step {step}" in results[0].stdout
    # What the program decided on, not how long this machine took: at the step it stopped, the estimate of one
    # more step and a checkpoint (1.5 s sleeps, so at least 1.1 s) would have ended past the budget.
    decision = re.search(
        r"would end at ([\d.]+) s of 14 s \(step ([\d.]+) s, checkpoint ([\d.]+) s\); saving a "
        rf"checkpoint at step {step} on all ranks",
        results[0].stdout,
    )
    assert decision, results[0].stdout[-3000:]
    end, step_s, save_s = map(float, decision.groups())
    assert end >= 14 and step_s >= 1.0 and save_s > 0, decision.group(0)
    r = run_train(args_for(setup, out, tokenizer_path), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert_same_run(out, reference, step)
