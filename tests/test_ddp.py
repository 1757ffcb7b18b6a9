"""Acceptance (c) and (d): DDP equivalence (invariant 2) and exact evaluation (invariant 3) of docs/DESIGN.md,
under torchrun."""

import math
import os

import pytest
import torch
from helpers import make_text_file, read_json, run_train, tiny_args, train_here


def load_weights(run_dir: str, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step}", "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_text_file(str(d / "train.txt"), n_lines=300, seed=1), make_text_file(
        str(d / "valid.txt"), n_lines=60, seed=2
    )


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, corpus, tiny_config_dir, tokenizer_path):
    steps = 4
    common = dict(
        train_file=corpus[0],
        validation_file=corpus[1],
        max_train_steps=steps,
        eval_on_start="false",
        eval_steps=1000,
        per_device_train_batch_size=4,
        seed=11,
    )
    two = str(tmp_path / "two")
    r = run_train(tiny_args(tiny_config_dir, tokenizer_path, two, str(tmp_path / "cache"), **common), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    one = str(tmp_path / "one")  # a world of one: in this process
    assert (
        train_here(
            tiny_args(
                tiny_config_dir, tokenizer_path, one, str(tmp_path / "cache"), gradient_accumulation_steps=2, **common
            )
        )
        == 0
    )
    w2, w1 = load_weights(two, steps), load_weights(one, steps)
    assert max_abs_diff(w2, w1) <= 1e-5
    # The comparison can fail: training moved the weights well beyond the tolerance, and a run that sees
    # half the global batch (no accumulation) ends elsewhere.
    half = str(tmp_path / "half")
    assert train_here(tiny_args(tiny_config_dir, tokenizer_path, half, str(tmp_path / "cache"), **common)) == 0
    assert max_abs_diff(load_weights(half, steps), w1) > 1e-3


def independent_masked_count(valid_file: str, tokenizer, seq: int, seed: int) -> int:
    """Tokenise, chunk and mask each validation example on its own, outside the evaluation loop."""
    from mlm.data.masking import EVAL_EPOCH, IGNORE_INDEX, MaskingSpec, build_masking_tables, mask_tokens

    stream = []
    with open(valid_file, encoding="utf-8") as fh:
        for line in fh.read().split("\n"):
            stream += tokenizer(line, add_special_tokens=False)["input_ids"]
    body = seq - 2
    tables, spec = build_masking_tables(tokenizer), MaskingSpec(seed=seed)
    total = 0
    for i in range(len(stream) // body):
        ids = torch.tensor([[tokenizer.cls_token_id, *stream[i * body : (i + 1) * body], tokenizer.sep_token_id]])
        _, labels = mask_tokens(ids, torch.tensor([i]), EVAL_EPOCH, spec, tables)
        total += int((labels != IGNORE_INDEX).sum())
    return total


def test_evaluation_is_exact_for_any_world_size_and_batch(tmp_path, corpus, tiny_config_dir, tokenizer_path, tokenizer):
    from transformers import AutoModelForMaskedLM, BertConfig

    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    AutoModelForMaskedLM.from_config(BertConfig.from_pretrained(tiny_config_dir)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    results = []
    for nproc, batch in ((1, 8), (2, 8), (2, 3), (1, 5)):
        out = str(tmp_path / f"eval-{nproc}-{batch}")
        args = tiny_args(
            None,
            None,
            out,
            str(tmp_path / "cache"),
            model_name_or_path=model_dir,
            train_file=corpus[0],
            validation_file=corpus[1],
            do_train="false",
            per_device_eval_batch_size=batch,
            seed=5,
        )
        if nproc == 1:  # a world of one: in this process
            assert train_here(args) == 0
        else:
            r = run_train(args, nproc=nproc)
            assert r.returncode == 0, r.output[-3000:]
        results.append(read_json(os.path.join(out, "eval_results.json")))
    expected = independent_masked_count(corpus[1], tokenizer, 32, seed=5)
    assert expected > 100
    for res in results:
        assert res["masked_tokens"] == expected
        assert math.isclose(res["perplexity"], results[0]["perplexity"], rel_tol=1e-6)
        assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
