"""Weights & Biases (offline, read back from wandb's own files), the logged metrics, MFU's FLOPs, and the
curves drawn without W&B."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import TINY_BERT, read_json, run_train, small_corpus, tiny_args
from wandb_offline import offline_runs, read_run

from mlm.inference.fill_mask import SAMPLE_SENTENCES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("tracking-corpus"))


def args(corpus, config, tokenizer, out, **kw) -> list[str]:
    opts = {
        **dict(
            train_file=corpus["train"],
            validation_file=corpus["valid"],
            max_train_steps=6,
            eval_steps=3,
            logging_steps=2,
            report_to="wandb",
            seed=5,
        ),
        **kw,
    }
    return tiny_args(config, str(tokenizer), out, corpus["cache"], **opts)


def train_steps(run) -> list[int]:
    return [h["_step"] for h in run.history if "train/loss" in h]


def test_two_ranks_write_one_wandb_run_with_the_series_and_config(corpus, tiny_config_dir, tokenizer_path, tmp_path):
    out = str(tmp_path / "run")
    r = run_train(
        args(
            corpus,
            tiny_config_dir,
            tokenizer_path,
            out,
            wandb_log_model="true",
            wandb_tags="exp,tiny",
            wandb_project="mlm-test",
        ),
        nproc=2,
        extra_env={"WANDB_MODE": "offline"},
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.output[-3000:]
    runs = offline_runs(out)
    assert len(runs) == 1, runs  # rank 1 started no run of its own
    assert not os.path.exists(tmp_path / "wandb")  # nor anywhere else
    run = read_run(runs[0])
    assert run.project == "mlm-test" and run.tags == ["exp", "tiny"]
    assert train_steps(run) == [2, 4, 6]
    assert [h["_step"] for h in run.history if "eval/perplexity" in h] == [0, 3, 6]
    for h in run.history:
        if "train/loss" in h:
            for key in (
                "loss_max",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "samples_per_s",
                "mfu",
                "peak_memory_gib",
                "peak_memory_reserved_gib",
                "skipped_steps",
            ):
                assert f"train/{key}" in h, key
            assert 0 < h["train/mfu"] < 1 and h["train/peak_memory_gib"] > 0.05
            assert h["train/peak_memory_reserved_gib"] >= h["train/peak_memory_gib"]
            assert h["train/loss_max"] >= h["train/loss"]
        if "eval/perplexity" in h:
            assert h["eval/predictions/nrows"] == len(SAMPLE_SENTENCES) and h["eval/predictions/ncols"] == 5
    assert run.config["world_size"] == 2 and run.config["learning_rate"] == 1e-3
    assert run.config["precision_resolved"] == "fp32" and "torch" in run.config["versions"]
    best = read_json(os.path.join(out, "best", "eval_results.json"))
    assert run.summary["best/perplexity"] == pytest.approx(best["perplexity"])
    assert run.summary["best/step"] == best["step"]
    assert f"model-{run.run_id}" in run.artifacts
    # The local history holds the same series.
    history = read_json(os.path.join(out, "training_history.json"))
    local = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert {h["_step"]: h["train/loss"] for h in run.history if "train/loss" in h} == pytest.approx(local)


def test_logged_loss_is_the_mean_over_all_ranks(corpus, tiny_config_dir, tokenizer_path, tmp_path):
    """Two ranks on different data log the loss of the whole global batch: the same number a single process
    logs when it sees that batch through accumulation. Rank 0's own loss would differ (loss_max shows it)."""
    common = dict(report_to="none", logging_steps=1, eval_steps=100, eval_on_start="false", max_train_steps=3)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    r = run_train(args(corpus, tiny_config_dir, tokenizer_path, two, **common), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    r = run_train(args(corpus, tiny_config_dir, tokenizer_path, one, gradient_accumulation_steps=2, **common), nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    h2 = [h for h in read_json(os.path.join(two, "training_history.json")) if "loss" in h]
    h1 = [h for h in read_json(os.path.join(one, "training_history.json")) if "loss" in h]
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == [1, 2, 3]
    for a, b in zip(h2, h1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["loss_max"] > a["loss"] + 1e-4  # the ranks' own means differ: the logged one is neither alone
        assert a["samples_per_s"] > 0 and a["skipped_steps"] == 0


def test_resumed_run_continues_the_same_wandb_run_without_duplicate_steps(
    corpus, tiny_config_dir, tokenizer_path, tmp_path
):
    out = str(tmp_path / "run")
    run_args = args(corpus, tiny_config_dir, tokenizer_path, out, logging_steps=1, save_steps=2)
    # Rank 0 fails right after computing step 4, before logging or saving it: the newest checkpoint is step 2,
    # while W&B already holds steps 1-3. The relaunch recomputes step 3 and must not send it again.
    r = run_train(run_args, nproc=2, fault={"kind": "raise", "rank": 0, "step": 4})
    assert r.returncode != 0
    first = read_run(offline_runs(out)[0])
    assert train_steps(first) == [1, 2, 3]
    r = run_train(run_args, nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "step 2)" in r.output  # resumed from the step-2 checkpoint: step 3 is computed again
    runs = [read_run(d) for d in offline_runs(out)]
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    steps = train_steps(runs[0]) + train_steps(runs[1])
    assert steps == [1, 2, 3, 4, 5, 6], steps  # step 3 is not sent twice
    evals = [h["_step"] for run in runs for h in run.history if "eval/loss" in h]
    assert evals == [0, 3, 6], evals
    history = read_json(os.path.join(out, "training_history.json"))
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_mfu_flops_match_a_count_of_the_models_own_matmuls():
    """mlm_step_flops against a count taken from the model itself: every nn.Linear of the encoder at every
    token, the two attention matmuls per layer, the head's Linears at the masked positions only; x3 for
    forward + backward."""
    from transformers import BertConfig, BertForMaskedLM

    from mlm.report.metrics import MlmShape, mlm_step_flops

    config = BertConfig(vocab_size=1000, **TINY_BERT)
    model = BertForMaskedLM(config)
    sequences, length, masked = 4, 32, 19
    tokens = sequences * length
    linear_macs = lambda module: sum(
        m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)
    )
    encoder = 2 * linear_macs(model.bert.encoder) * tokens
    attention = 2 * config.num_hidden_layers * 2 * length * length * config.hidden_size * sequences
    head = 2 * linear_macs(model.cls) * masked  # transform dense + decoder onto the vocabulary
    expected = 3 * (encoder + attention + head)
    got = mlm_step_flops(MlmShape.from_config(config), tokens, sequences * length**2, masked)
    assert got == pytest.approx(expected, rel=1e-12)
    # The head at all positions (what the Trainer runs) would cost more: masked-only is what is counted.
    assert mlm_step_flops(MlmShape.from_config(config), tokens, sequences * length**2, tokens) > got


def test_plot_writes_the_curves(corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd):
    """A run and `python -m mlm.report.plot` on it, both in this process (their main functions)."""
    import matplotlib.image
    import numpy as np

    import train_ddp
    from mlm.report import plot

    out = str(tmp_path / "run")
    assert train_ddp.main(args(corpus, tiny_config_dir, tokenizer_path, out, report_to="none", logging_steps=1)) == 0
    figures = str(tmp_path / "figures")
    assert plot.main([out, "--out", figures]) == 0
    for name in ("loss.png", "perplexity.png", "learning_rate.png"):
        path = os.path.join(figures, name)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        # Not a blank canvas: many distinct colours (axes, text, the curves) and some coloured pixels.
        flat = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
        assert len(np.unique(flat, axis=0)) > 20
        assert (np.ptp(flat.astype(int), axis=1) > 60).sum() > 100  # saturated (curve) pixels, not just grey
    capfd.readouterr()
    assert plot.main([str(tmp_path / "nothing-here")]) == 2
    err = capfd.readouterr().err
    assert err.strip().startswith("error:") and len(err.splitlines()) == 1, err


def test_missing_wandb_key_online_is_a_clear_error_not_a_prompt(corpus, tiny_config_dir, tokenizer_path, tmp_path):
    home = tmp_path / "home"
    home.mkdir()  # no ~/.netrc
    r = run_train(
        args(corpus, tiny_config_dir, tokenizer_path, str(tmp_path / "run")),
        nproc=0,
        timeout=60,
        extra_env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(home), "NETRC": str(home / ".netrc")},
    )
    assert r.returncode == 2, r.output[-2000:]
    assert r.stderr.strip().startswith("error:") and "wandb login" in r.stderr and "WANDB_API_KEY" in r.stderr


def test_the_history_is_appended_and_a_cut_loses_only_the_last_entry(tmp_path):
    """training_history.json grows by one line a log (a long run does not rewrite it); a failed append leaves
    the list it was, and a file cut mid-append still reads up to the cut."""
    from mlm.common import files

    path = str(tmp_path / files.HISTORY)
    files.write_json_list(path, [])
    assert files.read_history(str(tmp_path)) == []
    entries = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    for e in entries:
        before = os.path.getsize(path)
        files.append_json_list(path, e)
        assert os.path.getsize(path) - before == len(json.dumps(e)) + (2 if e["step"] > 1 else 1)
    assert files.read_history(str(tmp_path)) == entries
    assert json.load(open(path)) == entries  # plain JSON for any reader
    intact = open(path, "rb").read()

    class Full(OSError):
        pass

    original = files.os.fsync
    files.os.fsync = lambda fd: (_ for _ in ()).throw(Full(28, "No space left on device"))
    try:
        with pytest.raises(Full):
            files.append_json_list(path, {"step": 6, "loss": 0.1})
    finally:
        files.os.fsync = original
    assert open(path, "rb").read() == intact
    with open(path, "r+b") as fh:  # killed while appending the 6th: half its line, no closing bracket
        fh.seek(len(intact) - 3)
        fh.write(b',\n{"step": 6, "lo')
        fh.truncate()
    assert files.read_history(str(tmp_path)) == entries


def test_a_curve_of_one_logged_point_is_drawn(tmp_path, monkeypatch):
    """A newcomer's first short run logs one training point: each curve must show it (a marker), not a line of
    one point, which draws nothing."""
    import matplotlib.figure

    from mlm.common import files
    from mlm.report import plot

    files.write_json_list(
        str(tmp_path / files.HISTORY),
        [
            {"step": 20, "epoch": 0.1, "loss": 7.5, "lr": 5e-5},
            {"step": 20, "epoch": 0.1, "eval": {"loss": 7.4, "perplexity": 1636.0}},
        ],
    )
    drawn = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or original(fig, *a, **k)
    )
    plot.plot(str(tmp_path))
    lines = [line for fig in drawn for ax in fig.axes for line in ax.lines]
    curves = [line for line in lines if line.get_label() in ("train loss", "eval loss", "eval perplexity")]
    curves += [line for line in drawn[-1].axes[0].lines]  # the learning rate
    assert len(curves) == 4
    for line in curves:
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", ""), line.get_label()
