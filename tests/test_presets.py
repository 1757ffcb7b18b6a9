"""Issue 7 (c): the preset configs in configs/ parse and validate; smoke-cpu runs to completion offline."""

import glob
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, _env, minilm_path, read_json, run_train

from mlm.config import parse_args

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_the_documented_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {
        "wikitext2-bert-base.yaml",
        "wikitext103-bert-base.yaml",
        "imdb-distilbert.yaml",
        "smoke-cpu.yaml",
        "deberta-v3-base.yaml",
        "modernbert-base.yaml",
    } <= names
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert all(f"configs/{n}" in readme for n in names)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_parses_validates_and_means_what_it_says(path, tmp_path):
    with open(path) as fh:
        values = yaml.safe_load(fh)
    cfg = parse_args(["--config", path, "--output_dir", str(tmp_path / "out")])
    for key, value in values.items():
        if key != "output_dir":
            assert getattr(cfg, key) == value, key
    # The launch-time check (launch.sh and the SLURM example run it) accepts it too.
    p = subprocess.run(
        [sys.executable, "-m", "mlm.config", "--config", path],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr


def test_presets_name_what_the_issue_asks_for():
    cfg = {os.path.basename(p): parse_args(["--config", p]) for p in PRESETS}
    wt2, wt103 = cfg["wikitext2-bert-base.yaml"], cfg["wikitext103-bert-base.yaml"]
    imdb, smoke = cfg["imdb-distilbert.yaml"], cfg["smoke-cpu.yaml"]
    assert (wt2.model_name_or_path, wt2.dataset_config_name, wt2.streaming) == (
        "bert-base-uncased",
        "wikitext-2-raw-v1",
        False,
    )
    assert wt103.dataset_config_name == "wikitext-103-raw-v1" and wt103.streaming and wt103.max_train_steps
    assert imdb.model_name_or_path == "distilbert-base-uncased" and imdb.whole_word_mask
    assert smoke.from_scratch and smoke.precision == "fp32" and smoke.report_to == "none"


def test_smoke_cpu_runs_to_completion_offline(tmp_path, wikitext_dir):
    """As a user runs it: launch.sh, the preset, and local stand-ins for the Hub tokenizer and dataset."""
    out = str(tmp_path / "smoke")
    env = _env({"NPROC": "1", "MAX_RESTARTS": "0", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    p = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch.sh"),
            "--config",
            "configs/smoke-cpu.yaml",
            "--tokenizer_name",
            minilm_path(),
            "--dataset_dir",
            wikitext_dir,
            "--output_dir",
            out,
            "--data_cache_dir",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "finished at step 100 on all 1 ranks" in p.stdout
    evals = [e["eval"] for e in read_json(os.path.join(out, "training_history.json")) if "eval" in e]
    assert len(evals) == 3 and evals[-1]["perplexity"] < evals[0]["perplexity"] / 5  # it learned something
    assert os.path.isfile(os.path.join(out, "best", "model.safetensors"))


def test_wikitext103_preset_streams_with_offline_stand_ins(tmp_path, wikitext_dir):
    """The streaming multi-node preset, with MiniLM for bert-base and WikiText-2 files for WikiText-103, cut to
    a few steps: its own settings (2 loader workers, per-node cache, streaming) run as written."""
    out = str(tmp_path / "wt103")
    r = run_train(
        [
            "--config",
            os.path.join(ROOT, "configs", "wikitext103-bert-base.yaml"),
            "--model_name_or_path",
            minilm_path(),
            "--dataset_dir",
            wikitext_dir,
            "--output_dir",
            out,
            "--data_cache_dir",
            str(tmp_path / "cache"),
            "--max_train_steps",
            "4",
            "--eval_steps",
            "2",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "16",
            "--max_eval_samples",
            "32",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        nproc=0,
        timeout=300,
    )
    assert r.returncode == 0, r.output[-3000:]
    assert "finished at step 4 on all 1 ranks" in r.output
    state = read_json(os.path.join(out, "checkpoints", "step-4", "trainer_state.json"))
    assert [s["num_workers"] for s in state["extra"]["data_states"]] == [2]


def test_the_family_presets_say_what_their_families_need():
    deberta = parse_args(["--config", os.path.join(ROOT, "configs", "deberta-v3-base.yaml")])
    modern = parse_args(["--config", os.path.join(ROOT, "configs", "modernbert-base.yaml")])
    assert deberta.model_name_or_path == "microsoft/deberta-v3-base" and deberta.precision == "auto"
    assert deberta.attn_implementation == "auto" and deberta.max_nonfinite_steps > 0 and deberta.whole_word_mask
    assert modern.model_name_or_path == "answerdotai/ModernBERT-base" and modern.mlm_probability == 0.3
    assert modern.max_seq_length > 512


@pytest.mark.parametrize(
    "preset, family, positions",
    [("deberta-v3-base.yaml", "deberta-v3", 512), ("modernbert-base.yaml", "modernbert", 8192)],
)
def test_a_family_preset_runs_on_a_tiny_model_of_its_family(preset, family, positions, tmp_path, hf_env):
    """The preset as written, on its own data (WikiText-2 from the seeded Hub cache), with a tiny random model of
    its family in place of the Hub's; only the run's length and where it writes are cut for CI."""
    from families import save_family

    model = save_family(family, str(tmp_path / "model"), max_position_embeddings=positions)
    out = str(tmp_path / "run")
    r = run_train(
        [
            "--config",
            os.path.join(ROOT, "configs", preset),
            "--model_name_or_path",
            model,
            "--output_dir",
            out,
            "--data_cache_dir",
            str(tmp_path / "cache"),
            "--report_to",
            "none",
            "--max_train_steps",
            "2",
            "--max_eval_samples",
            "4",
            "--per_device_eval_batch_size",
            "4",
        ],
        nproc=0,
        extra_env=hf_env,
        timeout=300,
    )
    assert r.returncode == 0, r.output[-3000:]
    saved = read_json(os.path.join(out, "run_config.json"))
    values = yaml.safe_load(open(os.path.join(ROOT, "configs", preset)))
    for key in (
        "max_seq_length",
        "mlm_probability",
        "whole_word_mask",
        "gradient_accumulation_steps",
        "per_device_train_batch_size",
        "learning_rate",
        "dataset_name",
        "dataset_config_name",
    ):
        assert saved[key] == values.get(key, saved[key]), key
    assert saved["head_path"] == "masked positions only"
    assert saved["attention_resolved"] == ("eager" if family == "deberta-v3" else "sdpa")
    assert "finished at step 2 on all 1 ranks" in r.output
