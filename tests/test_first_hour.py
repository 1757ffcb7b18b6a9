"""A user's first hour: the README's default command with no data or model options, resolved by transformers'
and datasets' own offline lookup in seeded Hugging Face caches (tests/hf_cache.py), then `python predict.py`
with no options; the test perplexity of best/ (the same on 1 and 2 ranks) and best/'s model card."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import pytest
from helpers import ROOT, Result, free_port, minilm_path, once_for_all_workers, read_json, run_command
from hf_cache import DATASET, DATASET_CONFIG, MODEL_ID, seed_hf_home
from wandb_offline import offline_runs, read_run

RUN = f"{MODEL_ID}-{DATASET_CONFIG}"  # the default run directory's name
# Only options that shorten the run: steps (one: a step of the default batch costs 7 s on a CPU) and evaluation
# size.
STEPS = 1
SHORT = ["--max_train_steps", str(STEPS), "--max_eval_samples", "24"]


def torchrun() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="session")
def first_hour(tmp_path_factory, wikitext_dir):
    """Seeded caches, then `torchrun --nproc_per_node=2 train_ddp.py` and `python predict.py`, in a fresh working
    directory (where the default outputs/ goes), once for the whole test run."""
    done = once_for_all_workers(tmp_path_factory, "first-hour", lambda home: run_first_hour(home, wikitext_dir))
    return {**done, "train": Result(**done["train"]), "predict": Result(**done["predict"])}


def run_first_hour(home: str, wikitext_dir: str) -> dict:
    env = {
        **seed_hf_home(os.path.join(home, "hf-home"), minilm_path(), wikitext_dir),
        "XDG_CACHE_HOME": os.path.join(home, "cache"),  # the tokenised-data cache, throw-away too
        "PET_MASTER_PORT": str(free_port()),
    }  # torchrun's own variable: the command line stays as written
    work = os.path.join(home, "work")
    os.makedirs(work)
    train = run_command(
        [*torchrun(), "--nproc_per_node=2", os.path.join(ROOT, "train_ddp.py"), *SHORT],
        timeout=600,
        extra_env=env,
        cwd=work,
    )
    assert train.returncode == 0, train.output[-4000:]
    predict = run_command([sys.executable, os.path.join(ROOT, "predict.py")], timeout=180, extra_env=env, cwd=work)
    out = os.path.join(work, "outputs", RUN)
    return {"env": env, "work": work, "out": out, "train": asdict(train), "predict": asdict(predict)}


def test_the_default_command_resolves_model_and_data_through_the_libraries_caches(first_hour):
    out, train = first_hour["out"], first_hour["train"]
    assert f"{MODEL_ID} (22.7M parameters)" in train.stdout and "2 x cpu (gloo)" in train.stdout
    config = read_json(os.path.join(out, "run_config.json"))
    assert (config["model_name_or_path"], config["dataset_name"], config["dataset_config_name"]) == (
        MODEL_ID,
        DATASET,
        DATASET_CONFIG,
    )
    assert config["train_file"] is None and config["dataset_dir"] is None and config["world_size"] == 2
    assert max(h["step"] for h in read_json(os.path.join(out, "training_history.json"))) == STEPS
    assert os.path.isfile(os.path.join(out, "best", "model.safetensors"))


def test_predict_with_no_options_uses_the_newest_best(first_hour):
    p = first_hour["predict"]
    assert p.returncode == 0, p.output[-3000:]
    assert f"model: outputs/{RUN}/best (the newest best/ under outputs/)" in p.stdout
    assert p.stdout.count("\n> ") == 8  # the built-in sample sentences, each with its predictions


def test_best_is_evaluated_on_the_test_split_written_printed_and_logged(first_hour):
    out, train = first_hour["out"], first_hour["train"]
    test = read_json(os.path.join(out, "test_results.json"))
    best = read_json(os.path.join(out, "best", "eval_results.json"))
    assert test["step"] == best["step"] == STEPS
    assert test["masked_tokens"] > 0 and 1 < test["perplexity"] < 1e6
    assert best["test_perplexity"] == test["perplexity"] and best["test_accuracy"] == test["accuracy"]
    line = f"test (best/ from step {STEPS}): loss {test['loss']:.4f} perplexity {test['perplexity']:.3f}"
    assert line in train.stdout
    (run_dir,) = offline_runs(out)
    run = read_run(run_dir)
    logged = [h for h in run.history if "test/perplexity" in h]
    assert len(logged) == 1 and logged[0]["_step"] == STEPS
    assert logged[0]["test/perplexity"] == pytest.approx(test["perplexity"], rel=1e-12)
    assert logged[0]["test/accuracy"] == pytest.approx(test["accuracy"], rel=1e-12)
    assert run.summary["test/perplexity"] == pytest.approx(test["perplexity"], rel=1e-12)


def test_the_test_figure_is_the_same_on_one_rank(first_hour):
    """best/ of the 2-rank run, evaluated again by one process (--do_train false): the same exact figures."""
    out, work = first_hour["out"], first_hour["work"]
    again = os.path.join(work, "eval-one-rank")
    r = run_command(
        [
            sys.executable,
            os.path.join(ROOT, "train_ddp.py"),
            "--do_train",
            "false",
            "--model_name_or_path",
            os.path.join(out, "best"),
            "--max_eval_samples",
            "24",
            "--output_dir",
            again,
            "--report_to",
            "none",
        ],
        timeout=300,
        extra_env=first_hour["env"],
        cwd=work,
    )
    assert r.returncode == 0, r.output[-3000:]
    two, one = read_json(os.path.join(out, "test_results.json")), read_json(os.path.join(again, "test_results.json"))
    assert one["masked_tokens"] == two["masked_tokens"]
    assert one["perplexity"] == pytest.approx(two["perplexity"], rel=1e-6)
    assert one["accuracy"] == two["accuracy"]
    valid = read_json(os.path.join(again, "eval_results.json"))
    assert valid["perplexity"] == pytest.approx(
        read_json(os.path.join(out, "best", "eval_results.json"))["perplexity"], rel=1e-6
    )
    assert "test: " + json.dumps(one) in r.stdout


def test_best_has_a_model_card_the_hub_library_parses(first_hour):
    from huggingface_hub import ModelCard

    best = os.path.join(first_hour["out"], "best")
    card = ModelCard.load(os.path.join(best, "README.md"))
    assert card.data.base_model == MODEL_ID and card.data.datasets == [DATASET]
    assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers"
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    saved = read_json(os.path.join(best, "eval_results.json"))
    assert results[("validation", "perplexity")] == pytest.approx(saved["perplexity"], rel=1e-6)
    assert results[("test", "perplexity")] == pytest.approx(saved["test_perplexity"], rel=1e-6)
    assert results[("test", "accuracy")] == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert {r.dataset_config for r in card.data.eval_results} == {DATASET_CONFIG}
    text = card.text
    for needle in (
        "| validation |",
        "| test |",
        "64 = 32 per device x 2 processes x 1 accumulation",
        "2 x CPU processes",
        "| precision | fp32 |",
        f"best at step {STEPS} of {STEPS}",
        "of training |",
        'pipeline("fill-mask"',
        "The capital of France is [MASK].",
        "hf upload",
    ):
        assert needle in text, needle
