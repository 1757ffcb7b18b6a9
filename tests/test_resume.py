"""Resume restores the complete state: a run cut short and relaunched ends with the same weights (invariant 4,
docs/DESIGN.md)."""

import os
import shutil

from helpers import TINY_BERT, make_text_file, read_json, run_train, tiny_args, write_tiny_config
from test_ddp import load_weights, max_abs_diff


def test_relaunch_resumes_mid_epoch_exactly(tmp_path, tokenizer_path):
    # Dropout on: the per-rank RNG states must be restored too.
    config = write_tiny_config(
        str(tmp_path / "cfg"), **{**TINY_BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    )
    train = make_text_file(str(tmp_path / "train.txt"), n_lines=300, seed=1)
    valid = make_text_file(str(tmp_path / "valid.txt"), n_lines=60, seed=2)
    full = str(tmp_path / "full")
    args = lambda out: tiny_args(
        config,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=train,
        validation_file=valid,
        max_train_steps=6,
        save_steps=2,
        save_total_limit=10,
        eval_steps=3,
        gradient_accumulation_steps=2,
        seed=3,
    )
    r = run_train(args(full), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    state = read_json(os.path.join(full, "checkpoints", "step-2", "trainer_state.json"))
    assert state["micro_in_epoch"] == 4 and state["epoch"] == 0  # cut mid-epoch, not at a boundary
    # A copy of the run as if it had died right after step 2's checkpoint.
    cut = str(tmp_path / "cut")
    shutil.copytree(full, cut)
    for step in (4, 6):
        shutil.rmtree(os.path.join(cut, "checkpoints", f"step-{step}"))
    r = run_train(args(cut), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "resuming from" in r.output and "step 2)" in r.output
    assert max_abs_diff(load_weights(cut, 6), load_weights(full, 6)) <= 1e-6
    steps = [h["step"] for h in read_json(os.path.join(cut, "training_history.json")) if "loss" in h]
    assert steps == list(range(1, 7)), steps  # no duplicated history entries
    # Without the restored state the continuation differs: the check above can fail.
    assert max_abs_diff(load_weights(cut, 2), load_weights(full, 6)) > 1e-4
