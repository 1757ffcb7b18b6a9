"""GPU tests: collected only where CUDA is present (CI has none; bench/gpu_check.sh runs them on a GPU).

Where the offline MiniLM package and ../shared are missing (a bare GPU machine), MLM_GPU_ASSETS names the
folder bench/gpu_prepare.sh filled: tokenizer/ (the bert-base-uncased WordPiece files) and wikitext-2-raw-v1/.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import SHARED_WIKITEXT, minilm_path

# MLM_GPU_TESTS_DRY_RUN=1 collects them on a CPU too (a tiny model, CUDA-only checks skipped): a check of the
# tests themselves, for a developer without a GPU; CI does not set it.
_DRY_RUN = os.environ.get("MLM_GPU_TESTS_DRY_RUN") == "1"
collect_ignore_glob = [] if torch.cuda.is_available() or _DRY_RUN else ["test_*.py"]
ASSETS = os.environ.get("MLM_GPU_ASSETS")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def gpu_tokenizer() -> str:
    return os.path.join(ASSETS, "tokenizer") if ASSETS else minilm_path()


@pytest.fixture(scope="session")
def gpu_wikitext() -> str:
    return os.path.join(ASSETS, "wikitext-2-raw-v1") if ASSETS else SHARED_WIKITEXT
