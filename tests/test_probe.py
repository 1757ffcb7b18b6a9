"""The downstream probe (issue 33 a): labelled texts of the user's task, a cross-validated linear probe on the
encoder's features at every evaluation and on the model as loaded, in the banner, the log, the history, W&B and
the model card; --metric_for_best_model probe picks best/; the same figures on 1 and 2 ranks; one line for each
probe file that cannot be fitted."""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import WORDS, read_json, run_train, small_corpus, tiny_args, train_here
from wandb_offline import offline_runs, read_run

from mlm.common.cli import UserError
from mlm.config import TrainConfig
from mlm.data.probe import CLASSIFICATION, REGRESSION, load_probe
from mlm.report.probe import compare, fit_probe

# Two topics a bag of words tells apart; numbers for the regression follow the share of one topic's words.
TOPICS = {
    "animals": "cat dog mat fire slept children".split(),
    "places": "gardens trees rivers mountains skies".split(),
}


def probe_rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = "animals" if i % 2 == 0 else "places"
        words = [rng.choice(TOPICS[topic]) if rng.random() < 0.12 else rng.choice(WORDS) for _ in range(12)]
        share = sum(w in TOPICS["animals"] for w in words) / len(words)
        rows.append({"text": " ".join(words), "label": topic, "score": round(1 + 5 * share, 2)})
    return rows


def write_rows(path: str, rows: list[dict]) -> str:
    if path.endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("probe")
    return {**small_corpus(d), "probe": write_rows(str(d / "probe.csv"), probe_rows())}


def args(corpus, config, tokenizer, out, **kw) -> list[str]:
    opts = {
        **dict(
            train_file=corpus["train"],
            validation_file=corpus["valid"],
            probe_file=corpus["probe"],
            max_train_steps=4,
            eval_steps=2,
            logging_steps=2,
            report_to="none",
            seed=5,
            learning_rate=1e-3,
        ),
        **kw,
    }
    return tiny_args(config, str(tokenizer), out, corpus["cache"], **opts)


# ---------------------------------------------------------------------- the rows and their task
def test_text_labels_are_classes_numbers_a_regression_and_the_task_can_be_said(tmp_path):
    path = write_rows(str(tmp_path / "p.jsonl"), probe_rows(40))
    classes = load_probe(TrainConfig(probe_file=[path]))
    assert classes.task == CLASSIFICATION and classes.classes == ["animals", "places"]
    assert classes.targets[:2] == [0.0, 1.0] and len(classes.texts) == 40
    scores = load_probe(TrainConfig(probe_file=[path], probe_label_column="score"))
    assert scores.task == REGRESSION and scores.classes == [] and min(scores.targets) >= 1
    ids = write_rows(
        str(tmp_path / "ids.csv"), [{"text": r["text"], "label": i % 3} for i, r in enumerate(probe_rows(30))]
    )
    assert load_probe(TrainConfig(probe_file=[ids])).task == REGRESSION  # numbers, unless told
    told = load_probe(TrainConfig(probe_file=[ids], probe_task="classification"))
    assert told.task == CLASSIFICATION and told.classes == ["0", "1", "2"]


def test_a_sample_of_the_rows_is_drawn_once_by_the_seed_with_each_class_in_its_share(tmp_path):
    rows = probe_rows(60)
    rows[1]["label"] = rows[3]["label"] = "animals"  # 32 animals, 28 places
    path = write_rows(str(tmp_path / "p.csv"), rows)
    full = load_probe(TrainConfig(probe_file=[path]))
    sample = load_probe(TrainConfig(probe_file=[path], max_probe_samples=15, seed=3))
    assert len(sample.texts) == 15 and sample.file_rows == 60 and sample.describe().startswith("15 of 60 rows of ")
    where = [full.texts.index(t) for t in sample.texts]
    assert where == sorted(where)  # in file order
    assert all(full.targets[i] == t for i, t in zip(where, sample.targets))  # each text with its own label
    assert sorted(Counter(sample.targets).values()) == [7, 8]  # 32:28 of 15
    assert load_probe(TrainConfig(probe_file=[path], max_probe_samples=15, seed=3)) == sample
    assert load_probe(TrainConfig(probe_file=[path], max_probe_samples=15, seed=4)).texts != sample.texts
    assert load_probe(TrainConfig(probe_file=[path], max_probe_samples=60)) == full  # every row: no sample


def test_a_sample_too_small_for_a_class_s_folds_is_one_line(tmp_path):
    rows = [{**r, "label": "rare" if i < 5 else r["label"]} for i, r in enumerate(probe_rows(60))]
    path = write_rows(str(tmp_path / "p.csv"), rows)
    assert len(load_probe(TrainConfig(probe_file=[path])).classes) == 3  # every row: 5 rare rows, enough
    with pytest.raises(UserError) as e:
        load_probe(TrainConfig(probe_file=[path], max_probe_samples=20))
    said = str(e.value)
    assert said.startswith("--max_probe_samples 20: a sample of 20 of the 60 rows") and "\n" not in said
    assert "a class with 2 row(s), fewer than the 5 folds" in said and "give a larger --max_probe_samples" in said


def test_the_fit_separates_what_is_separable_and_is_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    separable = rng.normal(size=(200, 16)) + y[:, None] * 3.0
    noise = rng.normal(size=(200, 16))
    good = fit_probe(separable, y.astype(float), CLASSIFICATION, folds=5, seed=1)
    assert good["accuracy"] > 0.95 and good["macro_f1"] > 0.95
    chance = fit_probe(noise, y.astype(float), CLASSIFICATION, folds=5, seed=1)
    assert chance["accuracy"] < 0.7
    assert fit_probe(noise, y.astype(float), CLASSIFICATION, folds=5, seed=1) == chance
    target = separable @ rng.normal(size=16)
    fitted = fit_probe(separable, target, REGRESSION, folds=5, seed=1)
    assert fitted["pearson"] > 0.99 and fitted["rmse"] < 0.1 * float(np.std(target))


def test_each_fold_is_scored_on_its_own_rows():
    """The per-fold figures are those of the folds' held-out rows: their size-weighted mean squared error is the
    overall one, and a separable set is separated in every fold."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(103, 8))
    target = x @ rng.normal(size=8) + rng.normal(scale=0.5, size=103)
    fitted = fit_probe(x, target, REGRESSION, folds=5, seed=2)
    sizes = [21, 21, 21, 20, 20]  # KFold's split of 103 rows into 5
    pooled = sum(n * r**2 for n, r in zip(sizes, fitted["rmse_by_fold"])) / 103
    assert pooled == pytest.approx(fitted["rmse"] ** 2, rel=1e-9)
    y = np.arange(200) % 2
    separated = fit_probe(rng.normal(size=(200, 16)) + y[:, None] * 3.0, y.astype(float), CLASSIFICATION, 4, 1)
    assert len(separated["macro_f1_by_fold"]) == 4 and min(separated["macro_f1_by_fold"]) > 0.9


@pytest.mark.parametrize(
    "task, before, after, verdict",
    [
        (CLASSIFICATION, [0.5, 0.6, 0.7], [0.6, 0.7, 0.8], "better in all 3 folds: the adaptation helped this task"),
        (CLASSIFICATION, [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], "worse in all 3 folds: the adaptation hurt this task"),
        (CLASSIFICATION, [0.5, 0.6, 0.7], [0.9, 0.6, 0.6], "better in 1 of 3 folds: no clear change for this task"),
        (REGRESSION, [1.0, 1.2, 0.9], [0.8, 1.1, 0.7], "better in all 3 folds: the adaptation helped this task"),
        (REGRESSION, [1.0, 1.2, 0.9], [1.1, 1.3, 1.0], "worse in all 3 folds: the adaptation hurt this task"),
    ],
)
def test_the_comparison_counts_the_folds_where_best_did_better(task, before, after, verdict):
    """A lower RMSE is better, a higher macro-F1 is; a mixed count is no clear change, whatever the mean says."""
    name = "macro_f1" if task == CLASSIFICATION else "rmse"
    base = {name: float(np.mean(before)), f"{name}_by_fold": before}
    best = {name: float(np.mean(after)), f"{name}_by_fold": after}
    said = compare(base, best, task, best_step=40)
    label = "macro-F1" if task == CLASSIFICATION else "RMSE"
    change = best[name] - base[name]
    assert (
        said == f"{label} {base[name]:.4f} as loaded -> {best[name]:.4f} at best/ (step 40), {change:+.4f}; {verdict}"
    )


def test_the_comparison_says_when_best_is_the_model_as_loaded_or_folds_are_missing():
    base = {"macro_f1": 0.5, "macro_f1_by_fold": [0.5, 0.5]}
    assert compare(base, base, CLASSIFICATION, best_step=0).endswith(
        "best/ is the model as loaded, no step of training improved on it"
    )
    old = {"macro_f1": 0.5}  # a checkpoint's base figures from before the folds were kept
    assert compare(old, {"macro_f1": 0.6, "macro_f1_by_fold": [0.6, 0.6]}, CLASSIFICATION, 8).endswith(
        "+0.1000; the model as loaded was probed before per-fold figures were kept, so no fold count"
    )


def test_best_holding_the_swa_average_is_described_by_the_average_s_own_probe(
    corpus, tiny_config_dir, tokenizer_path, tmp_path, monkeypatch
):
    """When the SWA average has the lower perplexity, best/ holds it: the probe figures beside best/ (its
    eval_results, the card) are the average's, computed again here from best/'s weights, not the live model's.
    The average is made to lead by halving its perplexity: what is tested is what follows from it leading."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import mlm.train.loop as loop
    from mlm.common.distributed import DistEnv
    from mlm.config import parse_args
    from mlm.train.probe import build_probe, probe_figures

    real, fit, live = loop.evaluate, loop.fit, []

    def remember(run):  # the live model's loss module, to tell it from the average's
        live.append(run.trainable.loss)
        return fit(run)

    def average_leads(loss_module, *rest):
        figures = real(loss_module, *rest)
        if loss_module is not live[-1]:
            figures["perplexity"] /= 2
        return figures

    monkeypatch.setattr(loop, "evaluate", average_leads)
    monkeypatch.setattr(loop, "fit", remember)
    out = str(tmp_path / "swa")
    options = args(  # scores: a regression's RMSE tells two close models apart
        corpus,
        tiny_config_dir,
        tokenizer_path,
        out,
        swa_start_step=1,
        eval_on_start="false",
        probe_label_column="score",
    )
    assert train_here(options) == 0
    saved = read_json(os.path.join(out, "best", "eval_results.json"))
    assert saved["swa"] and saved["step"] == 4
    assert figures_of(saved["swa_probe"]) != figures_of(saved["probe"])  # the average is another model
    best = os.path.join(out, "best")
    model = AutoModelForMaskedLM.from_pretrained(best)
    cfg = parse_args(options)
    probe = build_probe(cfg, AutoTokenizer.from_pretrained(best))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    again = probe_figures(model, probe, env, "fp32")
    assert overall(saved["swa_probe"]) == pytest.approx(overall(again), abs=1e-6)
    card = open(os.path.join(best, "README.md"), encoding="utf-8").read()
    assert f"| this model (step 4) | {again['rmse']:.4f} | {again['pearson']:.4f} |" in card


# ---------------------------------------------------------------------- bad probe files: one line each
def bad_files(d) -> dict:
    good = probe_rows(40)
    return {
        "missing_column": (
            write_rows(str(d / "a.csv"), [{"text": r["text"], "topic": r["label"]} for r in good]),
            ["'label' is not a column", "--probe_label_column"],
        ),
        "one_class": (
            write_rows(str(d / "b.csv"), [{**r, "label": "animals"} for r in good]),
            ["every row has the 'label' label 'animals'", "at least two classes"],
        ),
        "labels_missing": (
            write_rows(str(d / "c.jsonl"), [{**r, "label": None} if i in (3, 7) else r for i, r in enumerate(good)]),
            ["2 of 40 rows have no 'label' label (first: row 4)", "fill them in or drop those rows"],
        ),
        "more_classes_than_rows": (
            write_rows(str(d / "e.csv"), [{**r, "label": f"id-{i}"} for i, r in enumerate(good)]),
            ["40 classes in 40 rows", "fewer than the 5 folds", "holds labels, not ids"],
        ),
        "no_rows": (write_rows(str(d / "f.csv"), []), ["has no rows", "a text and a label per row"]),
    }


@pytest.mark.parametrize("name", ["missing_column", "one_class", "labels_missing", "more_classes_than_rows", "no_rows"])
def test_a_probe_file_that_cannot_be_fitted_is_one_line(name, corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd):
    path, parts = bad_files(tmp_path)[name]
    out = str(tmp_path / "run")
    code = train_here(args({**corpus, "probe": path}, tiny_config_dir, tokenizer_path, out))
    captured = capfd.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), captured.err
    for part in parts:
        assert part in errors[0], errors[0]
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # said before any work


def test_the_probe_metric_needs_a_probe_file(tmp_path, capfd):
    import train_ddp

    assert train_ddp.main(["--metric_for_best_model", "probe", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--metric_for_best_model probe needs --probe_file" in capfd.readouterr().err


# ---------------------------------------------------------------------- a run with a probe
def figures_of(probe: dict) -> dict:
    """The probe's figures, without the seconds it took."""
    return {k: v for k, v in probe.items() if not k.endswith("seconds")}


def overall(figures: dict) -> dict:
    """The figures over all rows, without the per-fold lists."""
    return {k: v for k, v in figures.items() if not k.endswith("_by_fold")}


def probe_entries(out: str) -> list[tuple[int, dict]]:
    history = read_json(os.path.join(out, "training_history.json"))
    return [(h["step"], figures_of(h["eval"]["probe"])) for h in history if "eval" in h]


def test_a_run_probes_every_evaluation_and_the_card_compares_base_and_best(
    corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd
):
    from transformers import AutoTokenizer

    from mlm.config import parse_args
    from mlm.train.probe import build_probe

    out = str(tmp_path / "one")
    options = args(corpus, tiny_config_dir, tokenizer_path, out, metric_for_best_model="probe")
    assert train_here(options) == 0
    printed = capfd.readouterr().out
    assert f"60 rows of {corpus['probe']}, 2 classes (animals, places); 5-fold linear probe" in printed
    assert "best/ by probe macro-F1" in printed
    # What each probing costs beside an evaluation, said before the first step: the positions of its padded
    # batches against the evaluation's examples of 32 tokens.
    tokens = build_probe(parse_args(options), AutoTokenizer.from_pretrained(str(tokenizer_path))).tokens
    assert tokens >= 60 * 12  # at least a token a word
    examples = read_json(os.path.join(out, "best", "eval_results.json"))["examples"]
    assert f"at every evaluation ({tokens:,} tokens, {tokens / (examples * 32):.0%} of an evaluation's)" in printed
    entries = probe_entries(out)
    assert [s for s, _ in entries] == [0, 2, 4]
    for _, figures in entries:
        assert set(figures) == {"accuracy", "macro_f1", "macro_f1_by_fold"} and 0.0 <= figures["macro_f1"] <= 1.0
        assert len(figures["macro_f1_by_fold"]) == 5
    assert "probe accuracy" in printed and "macro-F1" in printed  # the evaluation's log line
    best = read_json(os.path.join(out, "best", "eval_results.json"))
    chosen = max(entries, key=lambda e: (e[1]["macro_f1"], -e[0]))  # the first of the best
    assert best["step"] == chosen[0] and figures_of(best["probe"]) == chosen[1]
    card = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    assert "## Your task: the downstream probe" in card and "best/ was chosen by probe macro-F1" in card
    base = entries[0][1]
    assert f"| base model, as loaded | {base['accuracy']:.4f} | {base['macro_f1']:.4f} |" in card
    assert f"| this model (step {chosen[0]}) | {chosen[1]['accuracy']:.4f} |" in card
    state = read_json(os.path.join(out, "checkpoints", "step-4", "trainer_state.json"))
    assert figures_of(state["extra"]["probe_base"]) == base
    # Did it help: said at the end and in the card, from the fold-by-fold figures of the history.
    folds = list(zip(base["macro_f1_by_fold"], chosen[1]["macro_f1_by_fold"]))
    better, worse = sum(a > b for b, a in folds), sum(a < b for b, a in folds)
    said = compare(base, chosen[1], CLASSIFICATION, chosen[0])
    count = {5: "better in all 5 folds"}.get(better) or {5: "worse in all 5 folds"}.get(worse)
    assert (count or f"better in {better} of 5 folds") in said or chosen[0] == 0
    assert f"your task (probe.csv): {said}" in printed
    assert f"Against the model as loaded: {said}." in card


def test_without_an_evaluation_at_the_start_the_model_as_loaded_is_still_probed(
    corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd
):
    out = str(tmp_path / "run")
    assert train_here(args(corpus, tiny_config_dir, tokenizer_path, out, eval_on_start="false")) == 0
    printed = capfd.readouterr().out
    assert "probe on the model as loaded: accuracy" in printed
    assert [s for s, _ in probe_entries(out)] == [2, 4]
    assert "| base model, as loaded |" in open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()


def test_a_resume_compares_with_the_model_as_loaded_only_on_the_same_rows(
    corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd
):
    """The base figures are kept in the checkpoint with the rows they were measured on: a resume on the same rows
    compares best/ with them; one that probes other rows says it cannot, instead of comparing two tasks."""
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    for out in (same, other):
        assert train_here(args(corpus, tiny_config_dir, tokenizer_path, out, max_train_steps=2)) == 0
    capfd.readouterr()
    assert train_here(args(corpus, tiny_config_dir, tokenizer_path, same, max_train_steps=4)) == 0
    assert "your task (probe.csv): macro-F1 " in capfd.readouterr().out
    rows = write_rows(str(tmp_path / "other.csv"), probe_rows(60, seed=9))
    assert train_here(args({**corpus, "probe": rows}, tiny_config_dir, tokenizer_path, other, max_train_steps=4)) == 0
    printed = capfd.readouterr().out
    said = "the model as loaded was probed on 60 rows (content "
    assert f"your task (other.csv): {said}" in printed and "this run probes 60 rows" in printed
    card = open(os.path.join(other, "best", "README.md"), encoding="utf-8").read()
    assert "| base model, as loaded |" not in card and "The model as loaded was probed on 60 rows" in card


def test_a_resume_that_changes_what_picks_best_is_refused(corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd):
    out = str(tmp_path / "run")
    assert train_here(args(corpus, tiny_config_dir, tokenizer_path, out, max_train_steps=2)) == 0
    capfd.readouterr()
    more = args(corpus, tiny_config_dir, tokenizer_path, out, max_train_steps=4, metric_for_best_model="probe")
    assert train_here(more) == 2
    err = capfd.readouterr().err
    assert "its figure that picks best/ was perplexity, this run's is probe macro-F1" in err, err


def test_two_ranks_give_the_one_rank_figures_and_log_them_to_wandb(
    corpus, tiny_config_dir, tokenizer_path, tmp_path, capfd
):
    """Each probe row once across the ranks, in the batch it always has: the figures of 1 and 2 ranks agree."""
    one = str(tmp_path / "one")  # the same global batch: 1 rank x accumulation 2 against 2 ranks x 1
    assert train_here(args(corpus, tiny_config_dir, tokenizer_path, one, gradient_accumulation_steps=2)) == 0
    capfd.readouterr()
    two = str(tmp_path / "two")
    r = run_train(
        args(corpus, tiny_config_dir, tokenizer_path, two, report_to="wandb"),
        nproc=2,
        extra_env={"WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.output[-3000:]
    ones, twos = probe_entries(one), probe_entries(two)
    assert [s for s, _ in ones] == [s for s, _ in twos] == [0, 2, 4]
    assert ones[0][1] == twos[0][1]  # the model as loaded: the same features, bit for bit, the same figures
    for (_, a), (_, b) in zip(ones[1:], twos[1:]):  # trained 2 x 1 against 1 x 2: equal within float tolerance
        assert overall(a) == pytest.approx(overall(b), abs=0.05)
    run = read_run(offline_runs(two)[0])
    logged = [h for h in run.history if "probe/macro_f1" in h]
    assert [h["_step"] for h in logged] == [0, 2, 4]
    assert logged[-1]["probe/accuracy"] == twos[-1][1]["accuracy"]
    assert not any("probe/macro_f1_by_fold" in h for h in logged)  # the per-fold lists stay in the history
    base, best = twos[0][1], read_json(os.path.join(two, "best", "eval_results.json"))["probe"]
    assert run.summary["base/probe_macro_f1"] == base["macro_f1"]
    assert run.summary["best/probe_macro_f1"] == best["macro_f1"]
