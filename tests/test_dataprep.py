"""Issue 24: the cached path prepares a corpus of any size in bounded memory, every rank reads it through the
memory map, and ranks wait for a long preparation without a timeout firing."""

import json
import logging
import os
import signal
import time
import tracemalloc

import numpy as np
import pytest
from helpers import make_text_file, run_train, tiny_args
from test_data import cfg_for

from mlm.common import files
from mlm.config import UserError, parse_args
from mlm.data import cached, cleaning, sources
from mlm.data.cached import build_datasets, load_token_streams, tokenize_texts
from mlm.data.sources import read_text_file


def small_batches(monkeypatch, rows: int) -> None:
    """Batches of `rows` texts, and the UTF-8 scan and the hash of a file in 1 MB blocks."""
    monkeypatch.setattr(sources, "TEXT_BATCH_ROWS", rows)
    monkeypatch.setattr(sources, "TEXT_BATCH_CHARS", rows * 200)
    monkeypatch.setattr(cleaning, "BLOCK", 1 << 20)
    monkeypatch.setattr(files, "HASH_BLOCK", 1 << 20)


def test_batches_of_any_size_give_the_same_streams(tokenizer, tmp_path, monkeypatch):
    """Read 7 texts at a time, the held-out validation split ends mid-batch: both splits, tokens and lengths,
    equal the whole file tokenised at once."""
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=400, seed=3)
    texts = read_text_file(path)
    n_val = len(texts) * 10 // 100
    assert n_val % 7 != 0
    whole = {"validation": tokenize_texts(tokenizer, texts[:n_val]), "train": tokenize_texts(tokenizer, texts[n_val:])}
    small_batches(monkeypatch, 7)
    calls = []

    def builder(tok, batch):
        calls.append(len(batch))
        return tokenize_texts(tok, batch)

    streams, hit, _ = load_token_streams(
        cfg_for(tmp_path, train_file=path, validation_split_percentage=10),
        tokenizer,
        str(tmp_path / "cache"),
        builder=builder,
    )
    assert not hit and max(calls) == 7 and sum(calls) == len(texts)
    for split in ("train", "validation"):
        assert np.array_equal(streams[split].tokens, whole[split].tokens)
        assert np.array_equal(streams[split].lengths, whole[split].lengths)


def test_a_bad_row_is_named_by_its_row_across_batches(monkeypatch):
    """Arrow data read 7 rows at a time: the row with a non-string text is named by its row in the split."""
    import datasets

    mixed = datasets.Features({"essay": datasets.Json()})
    rows = [{"essay": 19 if i == 19 else f"essay {i}"} for i in range(30)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows, features=mixed),
            "validation": datasets.Dataset.from_list(rows[:3], features=mixed),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    small_batches(monkeypatch, 7)
    cfg = lambda mode: parse_args(["--dataset_name", "someone/essays", "--text_column", "essay", "--text_errors", mode])
    with pytest.raises(UserError, match=r"split train row 20: 'essay' is int 19"):
        sources.build_source(cfg("error")).load()
    assert sources.build_source(cfg("skip")).load()["train"] == [f"essay {i}" for i in range(30) if i != 19]


def prepare_peak(tokenizer, tmp_path, name: str, n_lines: int) -> tuple[int, int]:
    """(corpus bytes, peak traced memory while load_token_streams prepares it)."""
    path = make_text_file(str(tmp_path / f"{name}.txt"), n_lines=n_lines, seed=5, words_per_line=(20, 60))
    cfg = cfg_for(tmp_path, train_file=path, validation_split_percentage=5)
    tracemalloc.start()
    try:
        streams, hit, _ = load_token_streams(cfg, tokenizer, str(tmp_path / f"cache-{name}"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not hit and streams["train"].tokens.size > n_lines * 10
    return os.path.getsize(path), peak


def test_preparation_memory_does_not_grow_with_the_corpus(tokenizer, tmp_path, monkeypatch):
    """A corpus and one 4 times larger, prepared in batches of 256 texts (1 MB blocks to scan and hash a file):
    the peak traced memory (Python objects and numpy arrays) is the same, and below the larger corpus itself.
    Holding every text at once, as before, needed several times the corpus."""
    small_batches(monkeypatch, 256)
    size_1, peak_1 = prepare_peak(tokenizer, tmp_path, "n", 6_000)
    size_4, peak_4 = prepare_peak(tokenizer, tmp_path, "4n", 24_000)
    assert size_4 > 3.9 * size_1 > 3_000_000
    assert peak_4 < 1.25 * peak_1 + (256 << 10), (peak_1, peak_4)
    assert peak_4 < size_4, (peak_4, size_4)


def test_every_split_is_read_through_the_memory_map(tokenizer, tmp_path):
    """Built or from the cache, each split's tokens and lengths are memory maps of the cache's files, and the
    training and evaluation datasets are views of them: no rank copies a split into RAM."""
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=300, seed=1)
    valid = make_text_file(str(tmp_path / "valid.txt"), n_lines=60, seed=2)
    for line_by_line in (False, True):
        cfg = cfg_for(tmp_path, train_file=path, validation_file=valid, max_seq_length=32, line_by_line=line_by_line)
        for attempt in range(2):  # built, then a cache hit
            streams, hit, _ = load_token_streams(cfg, tokenizer, str(tmp_path / "cache"))
            assert hit == (attempt == 1 or line_by_line)
            for stream in streams.values():
                assert isinstance(stream.tokens, np.memmap) and isinstance(stream.lengths, np.memmap)
            built = build_datasets(cfg, streams, tokenizer)
            for split, ds in built.items():
                held = ds.tokens if line_by_line else ds.bodies
                assert np.shares_memory(held, streams[split].tokens) and not held.flags.owndata


def test_a_long_preparation_shows_its_rate_and_what_is_left(tokenizer, tmp_path, monkeypatch, caplog):
    """Without a terminal, a long preparation logs how far it is, its MB/s and the time left."""
    monkeypatch.setattr(cached, "PROGRESS_LOG_SECONDS", 0)
    small_batches(monkeypatch, 50)
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=300, seed=1)
    with caplog.at_level(logging.INFO, logger="mlm"):
        load_token_streams(cfg_for(tmp_path, train_file=path), tokenizer, str(tmp_path / "cache"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenising")]
    assert len(lines) >= 5
    assert all(" MB/s, about " in line and line.endswith("min left") for line in lines)


def test_ranks_wait_for_a_preparation_longer_than_the_ddp_timeout(tmp_path, tiny_config_dir, tokenizer_path):
    """Rank 0 tokenises for 15 s more than it needs, with --ddp_timeout 10: rank 1 waits on rank 0's heartbeat,
    not on a collective's timeout, and the run trains to its end."""
    text = make_text_file(str(tmp_path / "train.txt"), n_lines=300, seed=1)
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=text,
        max_train_steps=2,
        eval_steps=1000,
        eval_on_start="false",
        ddp_timeout=10,
    )
    r = run_train(args, nproc=2, fault={"prep_sleep": 15})
    assert r.returncode == 0, r.output[-3000:]
    assert "finished at step 2 on all 2 ranks" in r.output and "tokenised and cached" in r.output


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "removed"])
def test_a_damaged_cache_entry_is_prepared_again(damage, tmp_path, tokenizer, caplog):
    """A cache entry's files are checked against the sizes and SHA-256 recorded when it was completed: a damaged
    one is said in a line and built again, with the same tokens (it was a traceback on every rerun)."""
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=300)
    cfg, cache = cfg_for(tmp_path, train_file=path), str(tmp_path / "cache")
    streams, hit, _ = load_token_streams(cfg, tokenizer, cache)
    first = {split: np.array(s.tokens) for split, s in streams.items()}  # copies: the maps go with the files
    del streams
    assert not hit
    entry = next(os.path.join(cache, n) for n in os.listdir(cache) if not n.startswith("."))
    victim = os.path.join(entry, "pool.tokens.bin")
    if damage == "truncated":
        os.truncate(victim, os.path.getsize(victim) // 2)
    elif damage == "overwritten":
        with open(victim, "r+b") as fh:
            fh.write(b"\xff" * 64)
    else:
        os.remove(victim)
    with caplog.at_level("WARNING", logger="mlm"):
        again, hit, _ = load_token_streams(cfg, tokenizer, cache)
    assert not hit and "are damaged" in caplog.text and "preparing them again" in caplog.text
    assert all(np.array_equal(first[s], again[s].tokens) for s in first)
    caplog.clear()
    _, hit, _ = load_token_streams(cfg, tokenizer, cache)  # the rebuilt entry is whole
    assert hit and "damaged" not in caplog.text


def test_an_abandoned_preparation_is_removed_by_the_next_run(tmp_path, tokenizer):
    """A preparation killed midway leaves its temporary entry; the next run removes it when its process is gone
    from this host, and leaves a live one alone."""
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, pid in ((".tmp-dead", int(dead.stdout)), (".tmp-live", os.getpid())):
        (cache / name).mkdir(parents=True)
        (cache / name / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        (cache / name / "pool.tokens.bin").write_bytes(b"\0" * 4096)
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=100)
    load_token_streams(cfg_for(tmp_path, train_file=path), tokenizer, str(cache))
    left = sorted(n for n in os.listdir(cache) if n.startswith("."))
    assert left == [".tmp-live"]


def test_ctrl_c_stops_a_long_preparation_and_removes_its_entry(tmp_path, tiny_config_dir, tokenizer_path):
    """Ctrl-C (SIGINT to the terminal's process group: torchrun and its workers) while rank 0 tokenises for a
    minute: it stops after the batch in hand, removes its unfinished entry and says so; every rank exits with 130,
    by that decision and not by the --stop_grace_seconds watchdog."""
    from helpers import ROOT, start, torchrun_command

    text = make_text_file(str(tmp_path / "train.txt"), n_lines=2400, seed=1)
    cache = tmp_path / "cache"
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(cache),
        train_file=text,
        max_train_steps=2,
        stop_grace_seconds=60,
    )
    fault = {"MLM_FAULT": json.dumps({"prep_batch_sleep": 0.5})}  # 120 batches of 20 texts: a minute
    script = os.path.join(ROOT, "tests", "faulty_train.py")
    p = start(torchrun_command(2, script, args), fault, new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (cache.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(cache))):
            assert p.poll() is None and time.monotonic() < deadline, "".join(p.communicate(timeout=10))
            time.sleep(0.2)
        time.sleep(1.0)  # a few batches in
        os.killpg(p.pid, signal.SIGINT)
        output = "".join(p.communicate(timeout=60))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert "stopped by SIGINT while preparing the data" in output, output[-3000:]
    assert "exit code 130" in output and "could not stop cleanly" not in output, output[-3000:]
    assert p.returncode != 0
    assert sorted(os.listdir(cache)) == [], os.listdir(cache)  # no entry, finished or not


def test_sigterm_stops_a_preparation_after_the_batch_in_hand(tokenizer, tmp_path, monkeypatch):
    """The same decision in this process, for a platform's SIGTERM: it arrives while the third batch is
    tokenised, the preparation stops after that batch, and neither the entry nor its temporary directory is left."""
    from mlm.train.preemption import StoppedPreparing, StopRequest

    small_batches(monkeypatch, 20)
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=400, seed=1)
    cache, batches = tmp_path / "cache", []

    def builder(tok, texts):
        batches.append(len(texts))
        if len(batches) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs in this (the main) thread at once
        return tokenize_texts(tok, texts)

    stop = StopRequest(grace_seconds=60).install()
    try:
        with pytest.raises(StoppedPreparing) as stopped:
            load_token_streams(
                cfg_for(tmp_path, train_file=path), tokenizer, str(cache), builder, stop.raise_if_signalled
            )
    finally:
        stop.uninstall()
    assert stopped.value.exit_code == 143 and len(batches) == 3
    assert os.listdir(cache) == []


def test_only_the_preparing_rank_hashes_a_cached_entry(tokenizer, tmp_path, monkeypatch):
    """A cache hit is verified (sizes and SHA-256) by the rank that prepares, once; the ranks that read the entry
    after it (verify=False, as build_data passes them) and the preparing rank right after building do not hash
    the files again."""
    path = make_text_file(str(tmp_path / "train.txt"), n_lines=300)
    cfg, cache = cfg_for(tmp_path, train_file=path), str(tmp_path / "cache")
    hashed = []
    monkeypatch.setattr(cached, "sha256_file", lambda p: hashed.append(p) or files.sha256_file(p))
    load_token_streams(cfg, tokenizer, cache)
    built = len(hashed)  # each file once, for the record written with the entry
    assert built > 0
    _, hit, _ = load_token_streams(cfg, tokenizer, cache, verify=False)
    assert hit and len(hashed) == built
    _, hit, _ = load_token_streams(cfg, tokenizer, cache)
    assert hit and len(hashed) == 2 * built
