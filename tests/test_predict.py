"""predict.py, the command line: inputs, --json, --targets, --compare, --interactive, bad input, and the
default run end to end (train_ddp.py, then `python predict.py` with no arguments)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time

import pytest
import torch
from helpers import make_text_file, run_predict, run_train, tiny_args

import predict
from mlm.inference.fill_mask import SAMPLE_SENTENCES, FillMask, Prediction

MULTI = "[MASK] [MASK] a [MASK] [MASK] ."
TEXTS = ["he [MASK] a good man .", MULTI, "she was a [MASK] woman ."]


def run_main(argv: list[str], capsys, stdin: str = "") -> tuple[int, str, str]:
    """predict.main in this process (the command-line path without the interpreter start-up)."""
    old = predict.sys.stdin
    predict.sys.stdin = io.StringIO(stdin)
    try:
        code = predict.main(argv)
    finally:
        predict.sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------- (c) --json, --targets, --compare
def test_json_output_parses_round_trips_and_matches_the_api(forced_model_dir, capsys):
    code, out, err = run_main(["--model", forced_model_dir, "--json", *TEXTS], capsys)
    assert code == 0, err
    objs = json_lines(out)
    assert len(objs) == len(TEXTS) and all(set(o) == {"text", "model", "masks", "fills"} for o in objs)
    assert f"model: {forced_model_dir}" in err  # notes go to stderr, so stdout is pure JSON Lines
    expected = FillMask(forced_model_dir).predict(TEXTS)
    for obj, line, exp in zip(objs, out.splitlines(), expected):
        pred = Prediction.from_dict(obj)
        assert pred.to_dict() == obj and json.dumps(obj, ensure_ascii=False) == line
        assert obj["text"] == exp.text and obj["model"] == forced_model_dir
        assert [c["token"] for c in obj["masks"][0]["candidates"]] == [c.token for c in exp.masks[0].candidates]
        assert [f["sequence"] for f in obj["fills"]] == [f.sequence for f in exp.fills]
        assert all(abs(f["score"] - g.score) < 1e-6 for f, g in zip(obj["fills"], exp.fills))
    multi = objs[1]
    assert len(multi["masks"]) == 4 and all(len(m["candidates"]) == 5 for m in multi["masks"])


def test_targets_restrict_the_candidates(forced_model_dir, capsys):
    code, out, err = run_main(["--model", forced_model_dir, "--json", "--targets", "good, bad", *TEXTS], capsys)
    assert code == 0, err
    for obj in json_lines(out):
        for m in obj["masks"]:
            assert {c["token"] for c in m["candidates"]} <= {"good", "bad"} and len(m["candidates"]) == 2
        for f in obj["fills"]:
            assert set(f["tokens"]) <= {"good", "bad"}
    # Scores stay probabilities over the whole vocabulary: "good" scores what it scores without --targets.
    plain = FillMask(forced_model_dir).predict("he is a [MASK] man .", top_k=20)[0].masks[0].candidates
    code, out, _ = run_main(
        ["--model", forced_model_dir, "--json", "--targets", "good", "he is a [MASK] man ."], capsys
    )
    got = json_lines(out)[0]["masks"][0]["candidates"]
    assert [c["token"] for c in got] == ["good"]
    assert abs(got[0]["score"] - next(c.score for c in plain if c.token == "good")) < 1e-6


def test_compare_shows_both_models_for_each_input(forced_model_dir, minilm_dir, capsys):
    code, out, err = run_main(["--model", forced_model_dir, "--compare", minilm_dir, *TEXTS[:2]], capsys)
    assert code == 0, err
    assert f"compared with {minilm_dir}" in out
    blocks = out.split("\n> ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        assert f"[{forced_model_dir}]" in block and f"[{minilm_dir}]" in block
        assert block.index(f"[{forced_model_dir}]") < block.index(f"[{minilm_dir}]")
    code, out, err = run_main(["--model", forced_model_dir, "--compare", minilm_dir, "--json", *TEXTS[:2]], capsys)
    for obj in json_lines(out):
        assert obj["model"] == forced_model_dir and obj["compare"]["model"] == minilm_dir
        assert obj["compare"]["text"] == obj["text"] and len(obj["compare"]["masks"]) == len(obj["masks"])
        assert Prediction.from_dict(obj).to_dict() == obj


def test_human_output_lists_masks_and_joint_fills(forced_model_dir, capsys):
    code, out, _ = run_main(["--model", forced_model_dir, "--top_k", "3", MULTI, "he [MASK] a good man ."], capsys)
    assert code == 0
    multi, single = out.split("\n> ")[1:]
    assert multi.startswith(MULTI)
    for k in range(1, 5):
        assert f"  mask {k} " in multi
    fills = multi.split("  joint fills:\n")[1].splitlines()
    assert len(fills) == 3 and all(float(line.split()[0]) > 0 for line in fills)  # top_k fills, scored
    assert "he is a good man." in multi and "she was a bad woman." in multi
    assert "joint fills:" not in single and "  mask    is" in single


# ---------------------------------------------------------------------- inputs
def test_file_and_stdin_inputs(forced_model_dir, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_text("he [MASK] a good man .\n\n   \n<mask> was a bad woman .\n")
    code, out, _ = run_main(["--model", forced_model_dir, "--json", "--file", str(path)], capsys)
    assert code == 0 and [o["text"] for o in json_lines(out)] == ["he [MASK] a good man .", "<mask> was a bad woman ."]
    code, out, _ = run_main(["--model", forced_model_dir, "--json", "-"], capsys, stdin=MULTI + "\nhe [MASK] .\n")
    assert code == 0 and [o["text"] for o in json_lines(out)] == [MULTI, "he [MASK] ."]


def test_batch_size_does_not_change_the_output(forced_model_dir, capsys):
    texts = TEXTS + ["he is [MASK] good [MASK] .", "[MASK] ."]
    outs = []
    for bs in ("1", "64"):
        code, out, _ = run_main(["--model", forced_model_dir, "--json", "--batch_size", bs, *texts], capsys)
        assert code == 0
        outs.append(json_lines(out))
    for a, b in zip(*outs):
        assert [[c["token"] for c in m["candidates"]] for m in a["masks"]] == [
            [c["token"] for c in m["candidates"]] for m in b["masks"]
        ]
        assert [f["sequence"] for f in a["fills"]] == [f["sequence"] for f in b["fills"]]
        assert all(abs(f["score"] - g["score"]) < 1e-5 for f, g in zip(a["fills"], b["fills"]))


def test_interactive_keeps_going_after_a_bad_line(forced_model_dir):
    r = run_predict(
        ["--model", forced_model_dir, "--interactive", "--json"],
        stdin="he [MASK] a good man .\nno mask here\n\n" + MULTI + "\nquit\nshe [MASK] .\n",
    )
    assert r.returncode == 0, r.output
    assert [o["text"] for o in json_lines(r.stdout)] == ["he [MASK] a good man .", MULTI]  # stops at quit
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no mask token; put [MASK]" in errors[0]
    assert "Traceback" not in r.output


# ---------------------------------------------------------------------- (e) bad input
BAD = {
    "no_mask": (["he is a good man ."], "input 1 ('he is a good man .') has no mask token; put [MASK] where"),
    "empty_text": ([""], "input 1 is empty"),
    "empty_file": (["--file", "{tmp}/empty.txt"], "holds no text"),
    "missing_file": (["--file", "{tmp}/nope.txt"], "cannot be read (No such file or directory)"),
    "empty_stdin": (["-"], "standard input held no text"),
    "missing_model_dir": (["--model", "{tmp}/no/such/model"], "does not exist; pass a run directory"),
    "dir_without_model": (["--model", "{tmp}/empty-dir"], "holds no model (no config.json"),
    "checkpoint_dir": (["--model", "{tmp}/run/checkpoints/step-4"], "is a resumable training checkpoint"),
    "too_long": (["he " * 200 + "[MASK]"], "is 203 tokens long but the model reads at most 128; shorten it"),
    "no_trained_run": ([], "no trained model under outputs/"),
    "top_k_zero": (["--top_k", "0", "he [MASK] ."], "--top_k must be at least 1, got 0"),
    "unknown_option": (["--no_such_option", "he [MASK] ."], "unrecognized arguments: --no_such_option"),
    "cuda_without_gpu": (["--device", "cuda", "he [MASK] ."], "no CUDA GPU is visible; use --device cpu"),
    "model_without_tokenizer": (["--model", "{tmp}/no-tokenizer", "he [MASK] ."], "holds a model but no tokenizer"),
    "compare_without_tokenizer": (["--compare", "{tmp}/no-tokenizer", "he [MASK] ."], "--compare '{tmp}/no-"),
    "compare_missing_dir": (["--compare", "{tmp}/no/such", "he [MASK] ."], "--compare '{tmp}/no/such' does not"),
    "joint_beam_too_wide": (["--top_k", "100000", "he [MASK] [MASK] ."], "the beam is at most 256"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_one_line_error_no_traceback(name, forced_model_dir, tmp_path, capfd, monkeypatch):
    """predict.main in this process, as `python predict.py ARGS` runs it (same cwd, same stdin)."""
    if name == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, problem = BAD[name]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "empty-dir").mkdir()
    os.makedirs(tmp_path / "run" / "checkpoints" / "step-4")
    (tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    os.makedirs(tmp_path / "no-tokenizer")  # save_pretrained's model files without the tokenizer's
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(forced_model_dir, f), tmp_path / "no-tokenizer")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    problem = problem.replace("{tmp}", str(tmp_path))
    if name not in (
        "no_trained_run",
        "missing_model_dir",
        "dir_without_model",
        "checkpoint_dir",
        "model_without_tokenizer",
    ):
        args = ["--model", forced_model_dir, *args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = predict.main(args)
    out, err = capfd.readouterr()
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert problem in lines[0], lines[0]
    assert not out.strip(), out  # nothing printed before the error


# ---------------------------------------------------------------------- (f) train, then predict.py
def test_default_run_end_to_end(tmp_path, tiny_config_dir, tokenizer_path):
    """torchrun train_ddp.py with its default output_dir, then `python predict.py` with no arguments."""
    work = tmp_path / "work"
    work.mkdir()
    text = make_text_file(str(work / "train.txt"), n_lines=300)
    args = tiny_args(
        tiny_config_dir, tokenizer_path, None, str(tmp_path / "cache"), train_file=text, max_train_steps=8, eval_steps=4
    )
    r = run_train(args, nproc=2, cwd=str(work), timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    runs = os.listdir(work / "outputs")
    assert len(runs) == 1, runs  # train_ddp.py wrote its default output_dir under outputs/
    best = os.path.join("outputs", runs[0], "best")

    r = run_predict([], cwd=str(work))
    assert r.returncode == 0, r.output
    assert r.stdout.startswith(f"model: {best} (the newest best/ under outputs/)")
    for sample in SAMPLE_SENTENCES:
        assert f"\n> {sample}\n" in r.stdout
    assert r.stdout.count("  joint fills:\n") == sum(s.count("[MASK]") > 1 for s in SAMPLE_SENTENCES)

    # A second, newer run: the newest best/ is used, and the note says which and names the other.
    time.sleep(0.01)
    shutil.copytree(work / best, work / "outputs" / "newer-run" / "best", copy_function=shutil.copy)  # new mtimes
    r = run_predict(["--json", "The capital of France is [MASK]."], cwd=str(work))
    assert r.returncode == 0, r.output
    newer = os.path.join("outputs", "newer-run", "best")
    assert f"model: {newer} (the newest of 2 runs under outputs/; the others: outputs/{runs[0]})" in r.stderr
    assert json_lines(r.stdout)[0]["model"] == newer
