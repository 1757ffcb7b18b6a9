"""Issue 8 (d): python -m mlm.train.search, Optuna over real (tiny) training runs with SQLite storage."""

import os
import sys

import optuna
import pytest
import yaml
from helpers import make_text_file, run_command

from mlm.config import parse_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_text_file(str(d / "train.txt"), n_lines=300, seed=1), make_text_file(
        str(d / "valid.txt"), n_lines=60, seed=2
    )


def write_base(path, tiny_config_dir, tokenizer_path, corpus, cache, space, steps: int = 8) -> str:
    base = dict(
        config_name=str(tiny_config_dir),
        tokenizer_name=str(tokenizer_path),
        train_file=corpus[0],
        validation_file=corpus[1],
        data_cache_dir=cache,
        max_seq_length=32,
        per_device_train_batch_size=8,
        max_train_steps=steps,
        eval_steps=4,
        logging_steps=4,
        warmup_ratio=0.0,
        early_stopping_patience=0,
        report_to="none",
        search_space=space,
    )
    path.write_text(yaml.safe_dump(base))
    return str(path)


def search(*args, cwd=None):
    return run_command([sys.executable, "-m", "mlm.train.search", *args], timeout=600, cwd=cwd or os.getcwd())


SPACE = {
    "learning_rate": {"low": 3e-4, "high": 5e-3, "log": True},
    "weight_decay": {"low": 0.0, "high": 0.1},
    "mlm_probability": {"low": 0.1, "high": 0.2},
    "num_warmup_steps": {"low": 0, "high": 3},
    "per_device_train_batch_size": {"choices": [4, 8]},
    "layerwise_lr_decay": {"low": 0.7, "high": 1.0},
}


def test_search_runs_persists_resumes_and_writes_the_best_config(tmp_path, tiny_config_dir, tokenizer_path, corpus):
    base = write_base(tmp_path / "base.yaml", tiny_config_dir, tokenizer_path, corpus, str(tmp_path / "cache"), SPACE)
    db = f"sqlite:///{tmp_path / 'search.db'}"
    common = ["--study_name", "tiny", "--storage", db, "--config", base, "--output_dir", str(tmp_path / "s")]
    r = search(*common, "--n_trials", "2", "--n_jobs", "2")
    assert r.returncode == 0, r.output[-3000:]
    study = optuna.load_study(study_name="tiny", storage=db)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 2
    assert "best trial" in r.stdout and "parameter importances" in r.stdout
    first = {t.number: t.params for t in study.trials}
    # Every trial was a real run: its history has the evaluations, its options the sampled values.
    for t in study.trials:
        opts = yaml.safe_load(open(tmp_path / "s" / f"trial-{t.number}" / "trial.yaml"))
        assert all(opts[k] == v for k, v in t.params.items())
        assert os.path.isfile(tmp_path / "s" / f"trial-{t.number}" / "run" / "training_history.json")
    # The same command again: the study resumes from SQLite and adds trials.
    r = search(*common, "--n_trials", "1")
    assert r.returncode == 0, r.output[-3000:]
    study = optuna.load_study(study_name="tiny", storage=db)
    assert len(study.trials) == 3 and {t.number: t.params for t in study.trials[:2]} == first
    assert "3 trials" in r.stdout
    # best.yaml is ready for train_ddp.py and holds the best trial's values.
    best_yaml = tmp_path / "s" / "best.yaml"
    cfg = parse_args(["--config", str(best_yaml)])
    for k, v in study.best_trial.params.items():
        assert getattr(cfg, k) == v
    assert "search_space" not in yaml.safe_load(open(best_yaml))


def test_median_pruning_stops_a_clearly_worse_trial(tmp_path, tiny_config_dir, tokenizer_path, corpus):
    base = write_base(
        tmp_path / "base.yaml",
        tiny_config_dir,
        tokenizer_path,
        corpus,
        str(tmp_path / "cache"),
        {"learning_rate": {"low": 1e-10, "high": 1e-2, "log": True}, "max_train_steps": {"choices": [12, 400]}},
    )
    db = f"sqlite:///{tmp_path / 'prune.db'}"
    study = optuna.create_study(study_name="prune", storage=db, direction="minimize")
    # A short run that learns, then a long one that cannot (forced through the queue): it must be stopped.
    for lr, steps in ((3e-3, 12), (1e-9, 400)):
        study.enqueue_trial({"learning_rate": lr, "max_train_steps": steps})
    r = search(
        "--study_name",
        "prune",
        "--storage",
        db,
        "--config",
        base,
        "--n_trials",
        "2",
        "--output_dir",
        str(tmp_path / "s"),
        "--pruner_startup_trials",
        "1",
    )
    assert r.returncode == 0, r.output[-3000:]
    trials = optuna.load_study(study_name="prune", storage=db).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert trials[1].params["learning_rate"] == 1e-9 and "trial 1: pruned at step 4" in r.stdout
    # The pruned run was stopped (SIGTERM: it saved and left): it never reached its last step.
    history = yaml.safe_load(open(tmp_path / "s" / "trial-1" / "run" / "training_history.json"))
    assert max(e["step"] for e in history) < 400
    assert "stop requested (SIGTERM)" in open(tmp_path / "s" / "trial-1" / "train.log").read()


def test_search_user_errors(tmp_path, capfd):
    """`python -m mlm.train.search` with a bad base config: its main, in this process."""
    from mlm.train import search as search_module

    bad = tmp_path / "bad.yaml"
    args = ["--study_name", "x", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--config", str(bad), "--n_trials", "1"]
    for text, word in (
        ("learning_rate: 1.0e-4\n", "search_space"),
        ("search_space:\n  learing_rate: {low: 1.0e-5, high: 1.0e-3}\n", "learing_rate"),
    ):
        bad.write_text(text)
        assert search_module.main(args) == 2
        out, err = capfd.readouterr()
        assert word in err and err.startswith("error:") and "Traceback" not in out + err, out + err
    assert not os.path.exists(tmp_path / "x.db")
