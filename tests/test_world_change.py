"""Resume on another number of processes (issue 17): the same global batch on any world size trains every step
after the resume on exactly the examples and masks of the run that never stopped (dropout off: the same final
weights within 1e-5); a precision change carries the master weights and optimizer over. Runs of one process run
in this process; several, under torchrun with gloo."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from helpers import make_text_file, read_json, run_train, tiny_args, train_here
from test_ddp import load_weights, max_abs_diff

from mlm.common.cli import UserError
from mlm.data.cached import EpochBatches, GlobalOrderSampler, fill_batch
from mlm.train import checkpoint

STEPS, SAVED = 12, 4


# ---------------------------------------------------------------------- the layout
class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices):
        idx = torch.tensor(indices, dtype=torch.long)
        return {
            "input_ids": torch.stack([torch.full((4,), 100 + int(i)) for i in idx])
            if len(idx)
            else torch.zeros((0, 4), dtype=torch.long),
            "index": idx,
        }


def step_examples(n: int, world: int, batch: int, accumulation: int, epoch: int, start_micro: int = 0):
    """The set of example indices of every optimizer step of an epoch, over all ranks."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalOrderSampler(Rows(n), world, rank, seed=5)
        loader = torch.utils.data.DataLoader(Rows(n), batch_size=batch, sampler=sampler, collate_fn=lambda b: b)
        batches = EpochBatches(loader, sampler, batch, special_ids=(1, 2))
        per_rank.append(
            [
                [int(i) for b in group for i in b["index"] if i >= 0]
                for group in batches.groups(epoch, start_micro, accumulation)
            ]
        )
    assert len({len(steps) for steps in per_rank}) == 1  # every rank takes the same number of steps
    return [sorted(sum((steps[s] for steps in per_rank), [])) for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("n", [37, 40, 5])
def test_a_global_steps_examples_do_not_depend_on_how_the_global_batch_is_made(n):
    layouts = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2), (8, 1, 1), (4, 1, 2)]  # W x b x A = 8
    for epoch in (0, 1):
        reference = step_examples(n, *layouts[0], epoch)
        assert sorted(sum(reference, [])) == list(range(n))  # each example once an epoch, none padded in
        assert len(reference) == -(-n // 8)
        for world, batch, accumulation in layouts[1:]:
            assert step_examples(n, world, batch, accumulation, epoch) == reference, (world, batch, accumulation)
        # Resumed after two steps on another layout: the rest of the epoch is the same.
        if len(reference) > 2:
            assert step_examples(n, 2, 2, 2, epoch, start_micro=2 * 2) == reference[2:]
    if n > 8:
        assert step_examples(n, 1, 8, 1, 0) != step_examples(n, 1, 8, 1, 1)  # a new order each epoch


def test_empty_rows_add_nothing():
    raw = fill_batch(
        {"input_ids": torch.zeros((0, 6), dtype=torch.long), "index": torch.zeros(0, dtype=torch.long)}, 3, 1, 2
    )
    assert raw["input_ids"].tolist() == [[1, 2, 2, 2, 2, 2]] * 3 and raw["index"].tolist() == [-1] * 3


def test_the_accumulation_that_keeps_the_global_batch():
    saved = {"world_size": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "precision": "fp32"}
    assert checkpoint.adapt_to_checkpoint(saved, 1, 4, None, "fp32")[0] == 2  # None: not given, so derived
    assert checkpoint.adapt_to_checkpoint(saved, 4, 2, None, "fp32")[0] == 1
    assert checkpoint.adapt_to_checkpoint(saved, 1, 4, 2, "fp32")[0] == 2  # given, and keeping it
    same, notes = checkpoint.adapt_to_checkpoint(saved, 2, 4, None, "fp32")
    assert same == 1 and notes == []
    changed, notes = checkpoint.adapt_to_checkpoint(saved, 2, 4, 3, "fp32")  # given: another global batch
    assert changed == 3 and notes[0].startswith(
        "global batch 8 (2 x 4 x 1) -> 24 (2 x 4 x 3, --gradient_accumulation_steps given): the epoch continues"
    )
    with pytest.raises(
        UserError,
        match=r"global batch 8 \(2 processes x 4 per device x 1 accumulation\) cannot be "
        r"made with --per_device_train_batch_size 4 on 4 processes: pass "
        r"--per_device_train_batch_size 2 --gradient_accumulation_steps 1",
    ):
        checkpoint.adapt_to_checkpoint(saved, 4, 4, None, "fp32")
    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        checkpoint.adapt_to_checkpoint(saved, 3, 4, None, "fp32")
    _, notes = checkpoint.adapt_to_checkpoint({**saved, "precision": "fp16"}, 2, 4, None, "bf16")
    assert notes == [
        "precision fp16 -> bf16: fp32 master weights and optimizer state carry over; the fp16 "
        "GradScaler's state is dropped"
    ]
    _, notes = checkpoint.adapt_to_checkpoint({**saved, "precision": "bf16"}, 2, 4, None, "fp16")
    assert "the fp16 loss scale starts fresh" in notes[0]


# ---------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_config_dir, tokenizer_path):
    d = tmp_path_factory.mktemp("world")
    # A small corpus: the 12 steps cross epoch ends, whose last step is partial and shared unevenly by the ranks.
    files = {
        "train_file": make_text_file(str(d / "train.txt"), n_lines=60, seed=21),
        "validation_file": make_text_file(str(d / "valid.txt"), n_lines=30, seed=22),
    }

    def args(out: str, **kw) -> list[str]:
        return tiny_args(
            tiny_config_dir,
            tokenizer_path,
            out,
            str(d / "cache"),
            **{
                **files,
                "max_train_steps": STEPS,
                "save_steps": SAVED,
                "save_total_limit": 10,
                "eval_steps": 6,
                "per_device_train_batch_size": 4,
                "seed": 13,
                **kw,
            },
        )

    reference = str(d / "reference")  # 2 processes x 4 per device x 1: global batch 8
    r = run_train(args(reference), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    examples = read_json(os.path.join(reference, "run_config.json"))
    assert examples["world_size"] == 2
    return {"args": args, "reference": reference}


def stopped_at(source: str, out: str, step: int) -> str:
    """A copy of a run directory as a run stopped after `step` would have left it."""
    shutil.copytree(source, out)
    for s, path in checkpoint.checkpoint_dirs(out):
        if s > step:
            shutil.rmtree(path)
    return out


def test_the_reference_crosses_epochs_and_moves(corpus):
    state = read_json(os.path.join(corpus["reference"], "checkpoints", f"step-{STEPS}", "trainer_state.json"))
    assert state["epoch"] >= 1  # the run crossed an epoch end
    assert max_abs_diff(load_weights(corpus["reference"], SAVED), load_weights(corpus["reference"], STEPS)) > 1e-3


def test_two_processes_resume_on_one(corpus, tmp_path, capsys):
    out = stopped_at(corpus["reference"], str(tmp_path / "run"), SAVED)
    capsys.readouterr()
    assert train_here(corpus["args"](out)) == 0  # accumulation 1 given: 2 derived to keep the global batch 8
    printed = capsys.readouterr().out
    assert "2 x 4 x 1 (processes x per device x accumulation) -> 1 x 4 x 2: global batch 8 kept" in printed
    assert "dropout generators seeded from (seed, step, rank)" in printed
    assert max_abs_diff(load_weights(out, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5
    history = [h["step"] for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h]
    assert history == list(range(1, STEPS + 1))
    hardware = read_json(os.path.join(out, "run_config.json"))["hardware_history"]
    assert [h["world_size"] for h in hardware] == [2, 1]


def test_one_process_resumes_on_two_and_two_on_four(corpus, tmp_path):
    one = str(tmp_path / "one")  # the same global batch made as 1 x 4 x 2: the same run (invariant 2)
    assert train_here(corpus["args"](one, gradient_accumulation_steps=2)) == 0
    assert max_abs_diff(load_weights(one, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5
    out = stopped_at(one, str(tmp_path / "1to2"), SAVED)
    r = run_train(corpus["args"](out), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "1 x 4 x 2 (processes x per device x accumulation) -> 2 x 4 x 1" in r.output
    assert max_abs_diff(load_weights(out, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5
    out = stopped_at(corpus["reference"], str(tmp_path / "2to4"), SAVED)
    r = run_train(corpus["args"](out, per_device_train_batch_size=2), nproc=4)
    assert r.returncode == 0, r.output[-3000:]
    assert "2 x 4 x 1 (processes x per device x accumulation) -> 4 x 2 x 1" in r.output
    assert max_abs_diff(load_weights(out, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5


def test_a_global_batch_that_cannot_be_kept_is_one_line(corpus, tmp_path, capsys):
    out = stopped_at(corpus["reference"], str(tmp_path / "run"), SAVED)
    capsys.readouterr()
    assert train_here(corpus["args"](out, per_device_train_batch_size=3)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "pass --per_device_train_batch_size 4 --gradient_accumulation_steps 2 to keep it" in err


def test_an_fp16_checkpoint_resumes_in_fp32_with_its_scaler_state_dropped(corpus, tmp_path, capsys):
    """A T4 run (fp16 + GradScaler) moved to a CPU: the saved precision and a real scaler state are faked in."""
    out = stopped_at(corpus["reference"], str(tmp_path / "run"), SAVED)
    path = os.path.join(out, "checkpoints", f"step-{SAVED}")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.save(scaler.state_dict(), os.path.join(path, "scaler.pt"))
    state = read_json(os.path.join(path, "trainer_state.json"))
    checkpoint.write_json_atomic(os.path.join(path, "trainer_state.json"), {**state, "precision": "fp16"})
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    checkpoint._write_manifest(path)  # as the fp16 run would have written it
    capsys.readouterr()
    assert train_here(corpus["args"](out)) == 0
    printed = capsys.readouterr().out
    assert (
        "precision fp16 -> fp32: fp32 master weights and optimizer state carry over; the fp16 GradScaler's "
        "state is dropped" in printed
    )
    assert max_abs_diff(load_weights(out, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found += [int(entry)] + _descendants(int(entry))
    return found


def test_an_elastic_job_that_loses_a_node_reforms_and_finishes(corpus, tmp_path):
    """torchrun --nnodes=1:2 --max-restarts=1, two "nodes" on loopback (one process each): the second node's agent
    and worker are killed after the step-4 checkpoint; the first node's torchrun re-forms the group alone, and the
    run resumes on one process (accumulation 2 keeps the global batch) and ends as the uninterrupted run.
    last_call_timeout is how long the first node waits for the second before it would start alone: 10 s, so a
    loaded machine that starts the second torchrun late still forms the group of two (2 s did not, once). A node's
    heartbeat every second, 3 missed: the vanished node leaves the rendezvous 3 s after its death, not 15 s."""
    import json
    import signal
    import sys

    from helpers import ROOT, Process, free_port, start, wait_all
    from test_resilience import wait_for_step

    out = str(tmp_path / "run")
    port = free_port()

    def node() -> Process:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1:2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=mlm-elastic-test",
            "--local_addr=127.0.0.1",
            "--max-restarts=1",
            "--rdzv-conf=last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3",
            os.path.join(ROOT, "tests", "faulty_train.py"),
            *corpus["args"](out),
        ]
        return start(cmd, {"MLM_FAULT": json.dumps({"sleep": 0.5})}, str(tmp_path), new_session=True)

    first = node()  # hosts the rendezvous store, so it must be the node that stays
    time.sleep(1.0)
    second = node()
    try:
        wait_for_step(out, SAVED + 2, [first, second], timeout=120)
        for pid in [second.pid] + _descendants(second.pid):  # the node vanishes: its agent and its worker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        result = wait_all([first], timeout=180)[0]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert result.returncode == 0, result.output[-4000:]
    assert "resuming from" in result.output and "-> 1 x 4 x 2: global batch 8 kept" in result.output
    assert "finished at step 12 on all 1 ranks" in result.output
    assert max_abs_diff(load_weights(out, STEPS), load_weights(corpus["reference"], STEPS)) <= 1e-5
    hardware = read_json(os.path.join(out, "run_config.json"))["hardware_history"]
    assert [h["world_size"] for h in hardware] == [2, 1]
    history = [h["step"] for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h]
    assert history == list(range(1, STEPS + 1))


def test_a_streamed_run_refuses_another_world_size_in_one_line(corpus, tmp_path, capsys):
    """A stream's position is each rank's place in its own shard: moved to another split it would train some
    texts twice, so the resume refuses (on the same world size it continues, tests/test_streaming.py)."""
    out = str(tmp_path / "stream")
    r = run_train(corpus["args"](out, streaming="true", max_train_steps=4, save_steps=2, eval_steps=2), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    capsys.readouterr()
    assert train_here(corpus["args"](out, streaming="true", max_train_steps=6, save_steps=2, eval_steps=2)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "written by a --streaming run on 2 processes; a stream cannot move to 1" in err
    assert "Resume on 2 processes" in err


def test_another_global_batch_continues_the_epoch_and_the_schedule_by_examples(corpus, tmp_path):
    """Global batch 8 for 4 steps (then the run fails), resumed with --gradient_accumulation_steps 2 (16): the
    rest of epoch 0 and then epoch 1 are trained with no example twice or left out, and the schedule (linear,
    12 steps of 8) continues from 32 examples seen: 64 examples left are 4 steps of 16, ending at lr 0."""
    import json

    out, record = str(tmp_path / "run"), str(tmp_path / "examples")
    r = run_train(
        corpus["args"](out), nproc=2, fault={"kind": "raise", "rank": 0, "step": SAVED + 1, "record": record + "-first"}
    )
    assert r.returncode != 0 and [s for s, _ in checkpoint.checkpoint_dirs(out)] == [SAVED]

    def steps(path: str, world: int) -> list[tuple[int, list[int]]]:
        """(epoch, example indices) per micro-step, all ranks together."""
        per_rank = [[json.loads(line) for line in open(f"{path}.rank{rank}")] for rank in range(world)]
        return [
            (rows[0]["epoch"], sorted(i for row in rows for i in row["index"] if i >= 0)) for rows in zip(*per_rank)
        ]

    first = steps(record + "-first", 2)[:SAVED]  # the steps the checkpoint holds (accumulation 1, 2 ranks)
    r = run_train(corpus["args"](out, gradient_accumulation_steps=2), nproc=2, fault={"record": record})
    assert r.returncode == 0, r.output[-3000:]
    assert "global batch 8 (2 x 4 x 1) -> 16 (2 x 4 x 2, --gradient_accumulation_steps given)" in r.output
    assert "4 more steps of 16" in r.output and "finished at step 8" in r.output
    second = steps(record, 2)
    trained = {
        0: [i for e, ix in first + second if e == 0 for i in ix],
        1: [i for e, ix in second if e == 1 for i in ix],
    }
    n = len(trained[1])
    assert n > 0 and sorted(trained[0]) == list(range(n)) and sorted(trained[1]) == list(range(n))
    history = {h["step"]: h for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h}
    assert sorted(history) == list(range(1, 9))
    assert history[SAVED + 1]["lr"] == pytest.approx(1e-3 * (12 - 6) / 12)  # 32 + 16 examples = 6 steps of 8
    assert history[8]["lr"] == 0.0


def test_a_resume_derives_its_plan_and_leaves_the_config_as_parsed(corpus, tmp_path):
    """The checkpoint's global batch 8 (2 x 4 x 1) on one process: the plan derives accumulation 2; with
    another accumulation given, the plan keeps it and finishes the schedule's examples in other steps. The
    config stays what the user asked for (docs/DESIGN.md: what a resume derives lives in mlm.train.plan)."""
    from types import SimpleNamespace

    import train_ddp
    from mlm.config import parse_command_line

    out = stopped_at(corpus["reference"], str(tmp_path / "run"), SAVED)
    resume = checkpoint.latest_complete_checkpoint(out)
    one_process = SimpleNamespace(world_size=1)
    cfg, given = parse_command_line(corpus["args"](out))
    asked = cfg.to_dict()
    plan = train_ddp.plan_run(cfg, one_process, "fp32", resume, given)
    assert (plan.layout.per_device, plan.layout.world_size, plan.layout.accumulation) == (4, 1, 2)
    assert plan.layout.describe() == "8 = 4 per device x 1 processes x 2 accumulation"
    assert plan.max_train_steps == STEPS and any("global batch 8 kept" in c for c in plan.changes)
    cfg4, given4 = parse_command_line(corpus["args"](out, gradient_accumulation_steps=4))
    plan4 = train_ddp.plan_run(cfg4, one_process, "fp32", resume, given4)
    assert plan4.layout.global_batch == 16 and plan4.max_train_steps == SAVED + (STEPS - SAVED) // 2
    assert cfg.to_dict() == asked and cfg4.gradient_accumulation_steps == 4 and not hasattr(cfg, "given")
    fresh = train_ddp.plan_run(cfg, one_process, "fp32", None, given)
    assert fresh.layout.accumulation == 1 and fresh.changes == ()
