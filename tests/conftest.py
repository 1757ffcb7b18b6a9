"""Shared fixtures. Every test runs offline: no Hub, no W&B servers (invariant 8, docs/DESIGN.md)."""

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_k] = _v


import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402
    READ_ONLY_MOUNTS,
    SHARED_WIKITEXT,
    TINY_BERT,
    make_text_file,
    minilm_path,
    sharpened_minilm,
    train_forced_model,
    write_tiny_config,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers (-n 2) share the cores with the torchrun subprocesses they start (OMP_NUM_THREADS=1 each):
    # in-process training at torch's default of one thread per core would oversubscribe them, and spinning
    # OpenMP threads then slow every process down.
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu/, collected only where CUDA is present)")


def pytest_unconfigure(config):
    import rank_pool

    rank_pool.close_all()


@pytest.fixture(autouse=True)
def unmount_read_only_dirs():
    """The read-only mounts a test made (helpers.read_only_dir), gone after it (a lazy unmount)."""
    import subprocess

    yield
    while READ_ONLY_MOUNTS:
        subprocess.run(["umount", "-l", READ_ONLY_MOUNTS.pop()], check=False)


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return minilm_path()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory) -> str:
    return write_tiny_config(str(tmp_path_factory.mktemp("tiny-bert")), **TINY_BERT)


@pytest.fixture()
def text_file(tmp_path) -> str:
    return make_text_file(str(tmp_path / "train.txt"), n_lines=400, seed=0)


@pytest.fixture(scope="session")
def forced_model_dir(tmp_path_factory) -> str:
    return train_forced_model(str(tmp_path_factory.mktemp("forced-bert")))


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> str:
    return sharpened_minilm(str(tmp_path_factory.mktemp("minilm-sharp")))


@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory) -> str:
    """The real WikiText-2 files from ../shared when they are there, else generated WikiText-style files."""
    if os.path.isfile(os.path.join(SHARED_WIKITEXT, "wiki.train.raw")):
        return SHARED_WIKITEXT
    d = tmp_path_factory.mktemp("wikitext")
    make_text_file(str(d / "wiki.train.raw"), n_lines=8000, seed=8)
    make_text_file(str(d / "wiki.valid.raw"), n_lines=600, seed=9)
    make_text_file(str(d / "wiki.test.raw"), n_lines=600, seed=10)
    return str(d)


@pytest.fixture(scope="session")
def hf_env(tmp_path_factory, wikitext_dir) -> dict:
    """Hugging Face caches seeded with what the default command downloads (tests/hf_cache.py), and the
    environment that points transformers and datasets at them, offline."""
    from hf_cache import seed_hf_home

    return seed_hf_home(str(tmp_path_factory.mktemp("hf-home")), minilm_path(), wikitext_dir)
