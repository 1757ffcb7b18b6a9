"""Acceptance (e): end to end on real WikiText-2 with the real pretrained MiniLM encoder, 2 CPU ranks."""

import os
import re

import pytest
from helpers import SHARED_WIKITEXT, minilm_path, read_json, run_train, tiny_args

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED_WIKITEXT), reason="needs ../shared/data/wikitext-2-raw-v1 beside the checkout"
)


def minilm_args(out: str, cache: str, **kw) -> list[str]:
    opts = dict(
        model_name_or_path=minilm_path(),
        dataset_dir=SHARED_WIKITEXT,
        max_train_samples=240,
        max_eval_samples=48,
        max_seq_length=64,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        learning_rate=3e-4,
        logging_steps=2,
        **kw,
    )
    return tiny_args(None, None, out, cache, **opts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One tokenised WikiText-2 for the module's runs (the first one prepares it, 6 s of MiniLM tokenising)."""
    return str(tmp_path_factory.mktemp("e2e-cache"))


def test_fine_tune_minilm_on_wikitext(tmp_path, cache):
    out = str(tmp_path / "run")
    # 16 steps: the loss falls from about 10.8 to about 7.3 by step 10 (lr 3e-4, batch 2 x 4 x 64).
    r = run_train(minilm_args(out, cache, max_train_steps=16, eval_steps=8), nproc=2, timeout=600)
    assert r.returncode == 0, r.output[-4000:]
    assert "finished at step 16 on all 2 ranks" in r.output
    history = read_json(os.path.join(out, "training_history.json"))
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval" in h]
    assert len(losses) == 8 and [h["step"] for h in evals] == [0, 8, 16]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # training loss falls
    assert evals[-1]["eval"]["perplexity"] < evals[0]["eval"]["perplexity"]
    assert evals[0]["eval"]["masked_tokens"] == evals[-1]["eval"]["masked_tokens"]  # fixed eval masks
    config = read_json(os.path.join(out, "run_config.json"))
    assert config["world_size"] == 2 and config["max_seq_length"] == 64
    from transformers import AutoModelForMaskedLM, pipeline

    best = os.path.join(out, "best")
    model = AutoModelForMaskedLM.from_pretrained(best)
    assert model.config.num_hidden_layers == 6
    fill = pipeline("fill-mask", model=best, device="cpu")
    preds = fill("The capital of France is [MASK].")
    assert len(preds) == 5 and all(0 <= p["score"] <= 1 for p in preds)
    assert read_json(os.path.join(best, "eval_results.json"))["step"] == 16
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-16"))


def test_patience_runs_out_and_both_ranks_stop_at_the_same_step(tmp_path, cache):
    out = str(tmp_path / "run")
    # min_delta so large that no evaluation counts as an improvement over the step-0 baseline.
    args = minilm_args(
        out, cache, max_train_steps=30, eval_steps=3, early_stopping_patience=2, early_stopping_min_delta=1e9
    )
    r = run_train(args, nproc=2, timeout=600)
    assert r.returncode == 0, r.output[-4000:]
    assert re.search(r"stopped early at step 6 on all 2 ranks", r.output), r.output[-3000:]
    history = read_json(os.path.join(out, "training_history.json"))
    assert max(h["step"] for h in history) == 6
    assert read_json(os.path.join(out, "best", "eval_results.json"))["step"] == 0
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-6"))
