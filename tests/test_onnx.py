"""Issue 8 (e): ONNX export with dynamic axes, checked with onnxruntime; predict.py --onnx."""

import json
import os
import re
import sys

import pytest
import torch
from helpers import TINY_BERT, minilm_path, run_command, run_predict

from mlm.inference.export_onnx import OnnxMaskedLM


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    d = str(tmp_path_factory.mktemp("tiny-mlm"))
    torch.manual_seed(3)
    model = BertForMaskedLM(BertConfig(vocab_size=30522, **TINY_BERT))
    with torch.no_grad():  # a confident head, so top-k orders are not decided by float noise
        model.cls.predictions.transform.LayerNorm.weight.mul_(20.0)
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d)
    return d


def export(model_dir: str, out: str):
    return run_command([sys.executable, "-m", "mlm.inference.export_onnx", model_dir, out], timeout=300)


def random_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (3, 23), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    attention = torch.ones_like(ids)
    attention[1, 11:], attention[2, 17:] = 0, 0  # padded rows
    return ids, attention


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_export_matches_pytorch_within_1e_4(which, tmp_path, tiny_model_dir, minilm_dir):
    from transformers import AutoModelForMaskedLM

    model_dir = tiny_model_dir if which == "tiny" else minilm_dir
    out = str(tmp_path / "model.onnx")
    r = export(model_dir, out)
    assert r.returncode == 0, r.output[-3000:]
    reported = float(re.search(r"max abs logit difference (\S+)", r.stdout).group(1))
    assert reported <= 1e-4
    # Independently: another batch size and length than the export's example, with padding.
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    ids, attention = random_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attention).logits
    got = OnnxMaskedLM(out, model.config)(input_ids=ids, attention_mask=attention).logits
    assert got.shape == ref.shape
    keep = attention.bool()
    assert (got[keep] - ref[keep]).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0  # the comparison is of real logits, not of zeros


def test_predict_with_onnx_gives_the_same_top_k(tmp_path, minilm_dir):
    out = str(tmp_path / "minilm.onnx")
    assert export(minilm_dir, out).returncode == 0
    texts = [
        "the capital of france is [MASK] .",
        "she [MASK] to the [MASK] every morning .",
        "a long sentence about the history of the city , which was [MASK] in the twelfth century .",
    ]
    runs = {}
    for label, extra in (("torch", []), ("onnx", ["--onnx", out])):
        r = run_predict(["--model", minilm_dir, "--json", "--top_k", "5", *extra, *texts])
        assert r.returncode == 0, r.output[-3000:]
        runs[label] = [json.loads(line) for line in r.stdout.splitlines()]
    assert all("ONNX" in p["model"] for p in runs["onnx"]) and not any("ONNX" in p["model"] for p in runs["torch"])
    for a, b in zip(runs["torch"], runs["onnx"]):
        for ma, mb in zip(a["masks"], b["masks"]):
            assert [c["token"] for c in ma["candidates"]] == [c["token"] for c in mb["candidates"]]
            assert max(abs(x["score"] - y["score"]) for x, y in zip(ma["candidates"], mb["candidates"])) <= 1e-5
        assert [f["sequence"] for f in a["fills"]] == [f["sequence"] for f in b["fills"]]


def test_onnx_user_errors_are_one_line(tmp_path, tiny_model_dir, capfd):
    """predict.py --onnx and python -m mlm.inference.export_onnx with bad files: their main functions, in this
    process."""
    import predict
    from mlm.inference import export_onnx

    def one_error(code: int, *words: str) -> None:
        out, err = capfd.readouterr()
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, out + err
        assert all(w in err for w in words) and "Traceback" not in out + err, err

    one_error(
        predict.main(["--model", tiny_model_dir, "--onnx", str(tmp_path / "missing.onnx"), "a [MASK] ."]),
        "does not exist",
    )
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    one_error(predict.main(["--model", tiny_model_dir, "--onnx", str(bad), "a [MASK] ."]), "could not be loaded")
    one_error(export_onnx.main([tiny_model_dir, str(tmp_path / "out.bin")]), "*.onnx")
    one_error(export_onnx.main([str(tmp_path / "nope"), str(tmp_path / "x.onnx")]))
    assert not os.path.exists(tmp_path / "x.onnx")


def test_exporting_leaves_the_pytorch_model_unchanged(tmp_path, minilm_dir):
    """The exporter changes the module it traces (seen: logits off by ~2.5 afterwards on longer inputs), so
    export() traces a copy; the caller's model, and the check against it, stay right."""
    from transformers import AutoModelForMaskedLM

    from mlm.inference.export_onnx import export as export_model

    model = AutoModelForMaskedLM.from_pretrained(minilm_dir).eval()
    ids, attention = random_batch(model.config.vocab_size, seed=4)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attention).logits
        export_model(model, str(tmp_path / "m.onnx"))
        after = model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(before, after)
