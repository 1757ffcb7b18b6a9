"""Did the adaptation help a task? The downstream probe before and after masked-LM training, on a labelled set
built from real text offline: WikiText-2 training paragraphs labelled by their article (the --articles articles
with the most paragraphs of at least 20 words). Also what the probe costs beside an evaluation of the default
size (the whole WikiText-2 validation split), from the seconds each took in the run's history. --words N keeps
the first N words of each paragraph: the probe's cost is its tokens, and this shows it for short rows.

    python bench/probe.py [--steps 150] [--articles 20] [--rows 2000] [--words N] [--out /tmp/mlm-probe-bench]

Prints a table; asserts nothing."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections import defaultdict

from common import WIKITEXT, machine, minilm_path

HEADING = re.compile(r"^= [^=].* =$")


def labelled_paragraphs(articles: int, rows: int, words: int = 0) -> list[dict]:
    by_article: dict[str, list[str]] = defaultdict(list)
    article = None
    with open(os.path.join(WIKITEXT, "wiki.train.raw"), encoding="utf-8") as fh:
        for line in fh:
            text = line.strip()
            if HEADING.match(text):
                article = text.strip("= ").strip()
            elif article and not text.startswith("=") and len(text.split()) >= 20:
                by_article[article].append(text)
    chosen = sorted(by_article, key=lambda a: (-len(by_article[a]), a))[:articles]
    out = [{"text": " ".join(t.split()[:words]) if words else t, "article": a} for a in chosen for t in by_article[a]]
    return out[:rows] if len(out) <= rows else [out[i * len(out) // rows] for i in range(rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--articles", type=int, default=20)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--words", type=int, default=0, help="keep each row's first N words (0: the whole paragraph)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="/tmp/mlm-probe-bench")
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    rows = labelled_paragraphs(a.articles, a.rows, a.words)
    probe_file = os.path.join(a.out, "wikitext-articles.jsonl")
    with open(probe_file, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    import train_ddp

    run_dir = os.path.join(a.out, "run")
    code = train_ddp.main(
        [
            *("--model_name_or_path", str(minilm_path()), "--dataset_dir", WIKITEXT, "--output_dir", run_dir),
            *("--data_cache_dir", os.path.join(a.out, "cache"), "--report_to", "none"),
            *("--max_train_steps", str(a.steps), "--eval_steps", str(a.steps), "--logging_steps", "50"),
            *("--per_device_train_batch_size", str(a.batch), "--learning_rate", "1e-4", "--num_warmup_steps", "10"),
            *("--probe_file", probe_file, "--probe_label_column", "article"),
        ]
    )
    if code != 0:
        raise SystemExit(f"the run failed with exit code {code}")
    with open(os.path.join(run_dir, "training_history.json")) as fh:
        evals = [h for h in json.load(fh) if "eval" in h]
    base, last = evals[0]["eval"], evals[-1]["eval"]
    print(f"machine: {machine()}; model: all-MiniLM-L6-v2 (fresh MLM head); {a.steps} steps of {a.batch} x 128")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_path())([r["text"] for r in rows], truncation=True, max_length=128)
    kept = f"their first {a.words} words" if a.words else "whole"
    print(f"probe: {len(rows)} WikiText-2 paragraphs ({kept}), {a.articles} articles, 5-fold logistic regression")
    print(f"probe tokens: {sum(len(i) for i in ids['input_ids']):,} after truncation to 128")
    print()
    print("| model | perplexity | probe accuracy | probe macro-F1 | eval s | probe s | probe / eval |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, e in (("as loaded (step 0)", base), (f"after {evals[-1]['step']} steps", last)):
        pr = e["probe"]
        print(
            f"| {name} | {e['perplexity']:.2f} | {pr['accuracy']:.4f} | {pr['macro_f1']:.4f} | "
            f"{pr['evaluation_seconds']:.1f} | {pr['seconds']:.1f} | {pr['seconds'] / pr['evaluation_seconds']:.0%} |"
        )


if __name__ == "__main__":
    main()
