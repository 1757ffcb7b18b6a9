"""Everything else holds for every family (issue 23 f), each on a small random model of it (tests/families.py):
DDP equivalence under 2 gloo ranks, exact resume, best/ loading in the fill-mask pipeline and for sequence
classification, predict.py equal to the pipeline, the ONNX export, and --torch_compile training like eager.

One 2-rank run per family carries the distributed part; the comparisons against it run in this process (a world
of one), which is where most of the cost of a family would otherwise go."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from families import save_family, training_text
from helpers import once_for_all_workers, read_json, run_train, train_here
from test_ddp import load_weights, max_abs_diff
from test_predict import json_lines, run_main

FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta", "electra", "albert", "modernbert", "deberta-v3"]
STEPS = 4


def write_corpus(d: str) -> tuple[str, str]:
    paths = []
    for name, n, seed in (("train.txt", 240, 11), ("valid.txt", 40, 12)):
        path = os.path.join(d, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(training_text(n, seed=seed)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def family_args(model_dir: str, out: str, cache: str, corpus, **kw) -> list[str]:
    opts = {
        "model_name_or_path": model_dir,
        "output_dir": out,
        "data_cache_dir": cache,
        "train_file": corpus[0],
        "validation_file": corpus[1],
        "max_seq_length": 32,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_train_steps": STEPS,
        "save_steps": 2,
        "eval_steps": 2,
        "save_total_limit": 10,
        "eval_on_start": "false",
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "logging_steps": 1,
        "report_to": "none",
        "seed": 5,
        **kw,
    }
    return [a for k, v in opts.items() if v is not None for a in (f"--{k}", str(v))]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict:
    """Every family saved, and trained for STEPS steps under 2 gloo ranks (the pool's, tests/rank_pool.py), once
    for the whole test run: {name: (model dir, run dir)}."""
    return once_for_all_workers(tmp_path_factory, "family-runs", train_families)


def train_families(d: str) -> dict:
    corpus = write_corpus(d)
    made = {
        name: (save_family(name, os.path.join(d, name, "model")), os.path.join(d, name, "two")) for name in FAMILIES
    }
    for name, (model, two) in made.items():
        r = run_train(family_args(model, two, os.path.join(d, "cache"), corpus), nproc=2, timeout=300)
        assert r.returncode == 0, f"{name}: {r.output[-4000:]}"
    return {"corpus": corpus, "cache": os.path.join(d, "cache"), **made}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_trains_resumes_exports_and_predicts(name, runs, tmp_path, capsys, monkeypatch):
    model_dir, two = runs[name]
    corpus, cache = runs["corpus"], runs["cache"]
    saved = read_json(os.path.join(two, "run_config.json"))
    assert saved["world_size"] == 2 and saved["head_path"] == "masked positions only"
    assert saved["attention_resolved"] == ("eager" if name == "deberta-v3" else "sdpa")
    reference = load_weights(two, STEPS)
    assert max_abs_diff(load_weights(two, 2), reference) > 1e-4  # training moved the weights: comparisons can fail

    # DDP equivalence: 1 rank x accumulation 2 sees the same global batches.
    one = str(tmp_path / "one")
    assert train_here(family_args(model_dir, one, cache, corpus, gradient_accumulation_steps=2)) == 0
    assert max_abs_diff(load_weights(one, STEPS), reference) <= 1e-5

    # Exact resume after a stop: the run cut after step 2's checkpoint and relaunched.
    cut = str(tmp_path / "cut")
    shutil.copytree(one, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", f"step-{STEPS}"))
    assert train_here(family_args(model_dir, cut, cache, corpus, gradient_accumulation_steps=2)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert max_abs_diff(load_weights(cut, STEPS), load_weights(one, STEPS)) <= 1e-6

    # --torch_compile trains like eager (graph capture through AOTAutograd, no code generation in CI).
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, **{**kw, "backend": "aot_eager"}))
    compiled = str(tmp_path / "compiled")
    assert (
        train_here(family_args(model_dir, compiled, cache, corpus, gradient_accumulation_steps=2, torch_compile="true"))
        == 0
    )
    monkeypatch.setattr(torch, "compile", real_compile)
    assert max_abs_diff(load_weights(compiled, STEPS), load_weights(one, STEPS)) <= 1e-5
    capsys.readouterr()

    check_best(os.path.join(two, "best"), tmp_path, capsys)


def check_best(best: str, tmp_path, capsys) -> None:
    """best/ is plain Hugging Face for the next steps of domain adaptation, and our tools agree with the pipeline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(best)
    texts = [f"the cat sat on {tok.mask_token} mat .", f"{tok.mask_token} dog slept near warm fire ."]
    fill = pipeline("fill-mask", model=best, tokenizer=best, device="cpu")
    expected = [fill(t, top_k=5) for t in texts]
    classifier = AutoModelForSequenceClassification.from_pretrained(best, num_labels=3)
    with torch.no_grad():
        logits = classifier(**tok(texts, padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    # predict.py (its main, in this process) equals the pipeline: the same tokens, scores within 1e-5.
    code, out, err = run_main(["--model", best, "--json", "--device", "cpu", *texts], capsys)
    assert code == 0, err
    for obj, exp in zip(json_lines(out), expected):
        got = obj["masks"][0]["candidates"]
        assert [c["token_id"] for c in got] == [e["token"] for e in exp]
        assert all(abs(c["score"] - e["score"]) <= 1e-5 for c, e in zip(got, exp))

    # ONNX: exported and checked against PyTorch by the exporter itself.
    from mlm.inference import export_onnx

    onnx_file = str(tmp_path / "best.onnx")
    assert export_onnx.main([best, onnx_file]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert float(out.rsplit("max abs logit difference ", 1)[1]) <= 1e-4 and os.path.isfile(onnx_file)


def test_an_architecture_the_onnx_exporter_refuses_is_one_line(tmp_path, capfd, monkeypatch):
    from mlm.inference import export_onnx

    model_dir = save_family("deberta-v3", str(tmp_path / "model"))

    def refuse(*args, **kwargs):
        with open(args[2], "w") as fh:  # a half-written file, which must not stay behind
            fh.write("partial")
        raise RuntimeError(
            "Exporting the operator 'aten::fancy_op' to ONNX opset version 17 is not supported.\n"
            "Please feel free to request support."
        )

    monkeypatch.setattr(torch.onnx, "export", refuse)
    code = export_onnx.main([model_dir, str(tmp_path / "m.onnx")])
    err = capfd.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "Traceback" not in err
    assert (
        "the ONNX exporter cannot export DebertaV2ForMaskedLM at opset 17 (Exporting the operator 'aten::fancy_op'"
        in err
        and "predict.py without --onnx" in err
    )
    assert os.listdir(tmp_path) == ["model"]  # no .onnx and no .tmp left


def test_deberta_keeps_training_through_steps_that_overflow(tmp_path):
    """DeBERTa-v3 is known to overflow in fp16. Steps 2 and 3 give a non-finite loss here (fp16 needs a GPU, so
    the overflow is injected): both are skipped, nothing non-finite reaches the weights, and the run trains on."""
    from safetensors.torch import load_file

    model_dir = save_family("deberta-v3", str(tmp_path / "model"))
    corpus, out = write_corpus(str(tmp_path)), str(tmp_path / "run")
    r = run_train(
        family_args(model_dir, out, str(tmp_path / "cache"), corpus, max_train_steps=6, save_steps=1, eval_steps=6),
        nproc=0,
        fault={"kind": "nan", "step": 2, "until": 3},
    )
    assert r.returncode == 0, r.output[-3000:]
    history = [h for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h]
    assert [h["skipped_steps"] for h in history] == [0, 1, 1, 0, 0, 0]
    # A skipped step leaves the weights as they were; the steps after it train.
    assert max_abs_diff(load_weights(out, 1), load_weights(out, 3)) == 0.0
    assert max_abs_diff(load_weights(out, 3), load_weights(out, 6)) > 1e-4
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(out, "best", "model.safetensors")).values())
