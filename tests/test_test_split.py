"""The test split: where it comes from (--test_file, wiki.test.raw, none), evaluated on best/ the same way on the
cached and the streamed path, and best/'s model card with and without it (in-process, tiny model)."""

from __future__ import annotations

import os

import pytest
from helpers import make_text_file, read_json, tiny_args, train_here


@pytest.fixture()
def files(tmp_path):
    return {
        split: make_text_file(str(tmp_path / f"{split}.txt"), n_lines=n, seed=seed)
        for split, n, seed in (("train", 300, 1), ("valid", 80, 2), ("test", 90, 3))
    }


def test_test_file_is_evaluated_on_best_and_written_beside_it(files, tiny_config_dir, tokenizer_path, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=files["train"],
        validation_file=files["valid"],
        test_file=files["test"],
        max_train_steps=4,
        eval_steps=2,
    )
    assert train_here(args) == 0
    test = read_json(os.path.join(out, "test_results.json"))
    best = read_json(os.path.join(out, "best", "eval_results.json"))
    assert test["step"] == best["step"] and test["masked_tokens"] > 0
    assert {k: best[f"test_{k}"] for k in ("loss", "perplexity", "accuracy", "masked_tokens")} == {
        k: test[k] for k in ("loss", "perplexity", "accuracy", "masked_tokens")
    }
    stdout = capsys.readouterr().out
    assert "evaluated on best/ at the end" in stdout and f"test (best/ from step {best['step']})" in stdout
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "best", "README.md"))
    assert card.data.base_model is None and card.data.datasets is None  # from scratch, local files
    assert {r.dataset_split for r in card.data.eval_results} == {"validation", "test"}
    assert "test.txt" in card.text and "A model built from scratch (tiny-bert" in card.text
    # A card is uploaded: it names local files and directories by their last component, never this machine's path.
    card_file = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    assert str(tmp_path) not in card_file and os.path.dirname(tiny_config_dir) not in card_file
    assert "every example of the split counted once" in card.text


def test_a_capped_evaluation_says_how_much_it_counted(files, tiny_config_dir, tokenizer_path, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=files["train"],
        validation_file=files["valid"],
        test_file=files["test"],
        max_train_steps=2,
        max_eval_samples=5,
    )
    assert train_here(args) == 0
    test = read_json(os.path.join(out, "test_results.json"))
    assert test["examples"] == 5 and test["split_examples"] > 5
    stdout = capsys.readouterr().out
    assert f"the first 5 of the split's {test['split_examples']} examples (--max_eval_samples)" in stdout
    card = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    assert "every example of the split counted once" not in card
    assert "the first 5 of the split's" in card


def test_without_a_test_split_nothing_is_tested_and_the_card_says_so(files, tiny_config_dir, tokenizer_path, tmp_path):
    out = str(tmp_path / "run")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=files["train"],
        validation_file=files["valid"],
        max_train_steps=2,
    )
    assert train_here(args) == 0
    assert not os.path.exists(os.path.join(out, "test_results.json"))
    assert "test_perplexity" not in read_json(os.path.join(out, "best", "eval_results.json"))
    text = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    assert "No test split was evaluated." in text and "| test |" not in text
    assert "The capital of France is [MASK]." in text  # the final card's example predictions


def test_the_streamed_path_tests_the_same_examples_as_the_cached_one(
    wikitext_dir, tiny_config_dir, tokenizer_path, tmp_path
):
    """The same model (seeded from scratch, --do_train false) on wiki.test.raw: the same exact figures whether the
    split is tokenised into the cache or read whole beside a stream."""
    results = {}
    for mode, extra in (("cached", {}), ("streamed", {"streaming": "true", "max_train_steps": 1})):
        out = str(tmp_path / mode)
        args = tiny_args(
            tiny_config_dir,
            tokenizer_path,
            out,
            str(tmp_path / f"cache-{mode}"),
            dataset_dir=wikitext_dir,
            do_train="false",
            max_eval_samples=40,
            **extra,
        )
        assert train_here(args) == 0
        results[mode] = read_json(os.path.join(out, "test_results.json"))
    assert results["cached"]["masked_tokens"] == results["streamed"]["masked_tokens"] > 0
    assert results["cached"]["perplexity"] == pytest.approx(results["streamed"]["perplexity"], rel=1e-9)


def test_a_missing_test_file_is_a_one_line_error(files, tiny_config_dir, tokenizer_path, tmp_path, capsys):
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "run"),
        str(tmp_path / "cache"),
        train_file=files["train"],
        test_file=str(tmp_path / "nope.txt"),
    )
    assert train_here(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--test_file" in err and "does not exist" in err
