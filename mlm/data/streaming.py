"""Streaming training data (--streaming): a `datasets` IterableDataset, split over every rank, tokenised and
packed in the loader workers, with a position that a checkpoint saves and a resume restores.

Per rank:
    load_dataset(..., streaming=True) -> shuffle(seed, buffer_size) -> split_dataset_by_node(rank, world_size)
    -> map(tokenise + pack into max_seq_length - 2 token bodies, batched) -> PackedBatches -> DataLoader workers

How the ranks divide the stream is datasets' rule: whole shards per rank when the shard count is a multiple of the
world size; otherwise every rank reads the stream and keeps every world_size-th packed example. Either way the
ranks' examples are disjoint.

An example's index, which with the seed and the position decides its mask, is its ordinal among the examples
this rank has consumed in the epoch, interleaved over the ranks (ordinal * world_size + rank): unique across the
ranks, and the same whatever the batch a run resumes in.

Resume: each loader worker attaches the dataset's own `state_dict()` to every batch it yields; the training
side keeps the state of the last batch it trained on per worker, and a checkpoint saves those. A resumed worker
loads its state, so the stream continues where training was, without yielding consumed examples again. The
shuffle buffer's content is not part of datasets' state: the texts in it at the save are skipped for the rest
of that epoch (never repeated). Within a shard datasets re-reads, without yielding, up to the saved position.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlm.common.cli import LocalUserError, UserError
from mlm.common.distributed import DistEnv, all_ranks, main_process_first
from mlm.config import TrainConfig
from mlm.data.cached import DataBundle, build_datasets, eval_loader, eval_stats, tokenize_texts
from mlm.data.cleaning import TextReport
from mlm.data.sources import (
    TextColumns,
    blank_stream,
    file_read_error,
    local_files,
    no_text_error,
    open_split,
    split_columns,
    split_label,
    stream_columns,
    whole_split,
)
from mlm.data.text import TextEncoder, frame, text_encoder

log = logging.getLogger("mlm")
PACK_TEXTS = 1000  # texts tokenised and packed together; the remainder under one body is dropped per group


def pack_function(
    encoder: TextEncoder,
    body: int,
    text_errors: str = "error",
    label: str = "the training stream",
    columns: TextColumns = TextColumns(),
):
    """Batched map: tokenise a group of texts, concatenate, cut into bodies of `body` tokens. Rows are read from
    the text column(s) and cleaned as --text_errors says; a stream's rows are met lazily, in a loader worker, so
    what is replaced or skipped is told once per worker in a warning (the banner is long printed), and an error
    is raised by the rank that met it (LocalUserError)."""
    report, told = TextReport(), set()

    def text(values: list) -> Optional[str]:
        try:
            t = columns.row_text(values, text_errors, f"{label}: a row", report, label)
        except UserError as e:
            raise LocalUserError(str(e)) from None
        for what in report.counts.get(label, {}):
            if what not in told:
                told.add(what)
                log.warning(f"warning: {label}: {what} (--text_errors {text_errors}); further ones are not told")
        return t

    def pack(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in map(text, zip(*(batch[n] for n in columns.names))) if t is not None]
        ids = encoder.ids(texts)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        n = flat.size // body
        return {"input_ids": flat[: n * body].reshape(n, body).tolist()}

    return pack


def rank_stream(cfg: TrainConfig, env: DistEnv, encoder: TextEncoder, report: TextReport):
    """This rank's shuffled share of the training split, as packed bodies of max_seq_length - 2 tokens."""
    from datasets.distributed import split_dataset_by_node

    ds = open_split(cfg, "train", report)
    columns = stream_columns(ds)
    ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer_size)
    ds = split_dataset_by_node(ds, rank=env.rank, world_size=env.world_size)
    pack = pack_function(
        encoder, cfg.max_seq_length - 2, cfg.text_errors, split_label(cfg, "train"), split_columns(cfg, "train")
    )
    return ds.map(pack, batched=True, batch_size=PACK_TEXTS, remove_columns=columns)


class PackedBatches(torch.utils.data.IterableDataset):
    """Batches of framed examples ([CLS] body [SEP]), each with the worker that made it and the stream's state
    just after it. Only full batches: a worker's last partial batch of an epoch is dropped."""

    def __init__(
        self, stream, batch_size: int, max_seq_length: int, cls_id: int, sep_id: int, files: Sequence[str] = ()
    ):
        """files: the local files the stream reads, to name the line a JSON file breaks at."""
        self.stream, self.batch_size, self.files = stream, batch_size, list(files)
        self.max_seq_length, self.cls_id, self.sep_id = max_seq_length, cls_id, sep_id
        self.start_states: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        stream = self.stream
        if worker in self.start_states:
            stream = copy.deepcopy(stream)  # loading a state must not stick to the dataset for later epochs
            stream.load_state_dict(self.start_states[worker])
        rows: list[list[int]] = []
        try:
            for example in stream:
                rows.append(example["input_ids"])
                if len(rows) == self.batch_size:
                    ids = frame(np.asarray(rows, dtype=np.int64), self.cls_id, self.sep_id)
                    yield {"input_ids": torch.from_numpy(ids), "worker": worker, "state": stream.state_dict()}
                    rows = []
        except UserError:
            raise
        except Exception as e:
            bad = file_read_error(self.files, e)  # the same line the cached path gives, not datasets' pages
            if bad is None:
                raise
            raise LocalUserError(bad) from None


def _let_queue_threads_finish(seconds: float = 2.0) -> None:
    """Wait for the previous epoch's loader to finish closing its queues before this one forks its workers.

    Closing a multiprocessing queue ends its feeder thread a moment later. On CPython 3.11 a fork made while
    a thread is ending can deadlock the child in PyOS_AfterFork_Child (the interpreter's thread-list lock is
    held at the fork): a loader worker hung at an epoch start that way, once in eight suite runs."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name == "QueueFeederThread":
            thread.join(timeout=seconds)


class StreamingTrain:
    """The training side of fit() for a stream: groups of micro-batches until a rank's stream ends.

    The ranks agree at every step whether all of them have a full group (one int over the CPU control group),
    so when one rank's share runs out, every rank ends the epoch at the same step instead of waiting in a
    collective the other skipped."""

    micro_per_epoch = None  # unknown: a stream's length is found by reading it

    def __init__(self, dataset: PackedBatches, env: DistEnv, num_workers: int, seed: int):
        self.dataset, self.env, self.num_workers, self.seed = dataset, env, num_workers, seed
        self.consumed: dict[int, dict] = {}  # worker -> stream state after the last batch trained on
        self.consumed_epoch = 0

    def groups(
        self, epoch: int, micro_done: int, accumulation: int, offset: int = 0
    ) -> Iterator[list[dict[str, torch.Tensor]]]:  # offset: map-style data only
        if self.consumed_epoch != epoch:
            self.consumed, self.consumed_epoch = {}, epoch
        self.dataset.stream.set_epoch(epoch)  # a new shuffle order each epoch
        self.dataset.start_states = dict(self.consumed)
        _let_queue_threads_finish()
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )  # no draw from the global RNG
        batches, b = iter(loader), self.dataset.batch_size
        while True:
            group = list(itertools.islice(batches, accumulation))
            if not all_ranks(len(group) == accumulation, self.env):
                return
            out = []
            for raw in group:
                self.consumed[raw["worker"]] = raw["state"]
                ordinal = micro_done * b + torch.arange(b, dtype=torch.long)
                out.append({"input_ids": raw["input_ids"], "index": ordinal * self.env.world_size + self.env.rank})
                micro_done += 1
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.consumed_epoch,
            "num_workers": self.num_workers,
            "workers": {str(k): v for k, v in self.consumed.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "workers" not in d:
            raise UserError(
                "the checkpoint holds no stream position: it was saved by a run without --streaming; "
                "resume it without --streaming, or start afresh with --overwrite_output_dir"
            )
        if d.get("num_workers") != self.num_workers:
            raise UserError(
                f"the checkpoint's stream position was saved with --dataloader_num_workers "
                f"{d.get('num_workers')}, this run has {self.num_workers}: each worker reads its own "
                "part of the stream, so resume with the same number"
            )
        self.consumed = {int(k): v for k, v in d["workers"].items()}
        self.consumed_epoch = d["epoch"]
        if self.env.is_main:
            log.info(
                "the stream continues from its saved position in epoch %d (texts that were in the shuffle "
                "buffer at the save are skipped for this epoch, never repeated)",
                d["epoch"],
            )


def build_streaming_data(cfg: TrainConfig, env: DistEnv, tokenizer) -> DataBundle:
    """Training from a stream (tokenised in the loader workers); validation (and test) read whole, tokenised
    here."""
    t0 = time.perf_counter()
    if cfg.loader_workers > 0:
        # The workers are the tokenising parallelism. A tokenizer thread pool used before the workers fork can
        # deadlock in them, even when TOKENIZERS_PARALLELISM=true asks for it: keep it off in this process.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Downloads of the validation split (and the Hub script/metadata) happen once per node, or once in all.
    report = TextReport()

    def read_whole_splits() -> dict[str, Optional[list[str]]]:
        if blank_stream(cfg, "train"):  # the cached path's line for a training file of blank lines
            raise no_text_error(split_label(cfg, "train"))
        return {split: whole_split(cfg, split, report) for split in ("validation", "test")}

    texts = main_process_first(env, read_whole_splits, per_node=cfg.cache_scope == "node")
    streams = {split: tokenize_texts(tokenizer, t) for split, t in texts.items() if t is not None}
    built = build_datasets(cfg, streams, tokenizer)
    valid, test = built["validation"], built.get("test")
    stream = rank_stream(cfg, env, text_encoder(tokenizer), report)
    batches = PackedBatches(
        stream,
        cfg.per_device_train_batch_size,
        cfg.max_seq_length,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        files=local_files(cfg, "train") or (),
    )
    workers = cfg.loader_workers
    stats = {
        "train": f"streamed: {split_label(cfg, 'train')}, shuffle buffer "
        f"{cfg.shuffle_buffer_size} texts, packed into {cfg.max_seq_length}-token examples by "
        f"{workers or 'no'} loader worker(s) per rank",
        **eval_stats(valid, test, streams, cfg.max_seq_length),
        "data": f"validation{' and test' if 'test' in streams else ''} read whole and tokenised in "
        f"{time.perf_counter() - t0:.2f} s",
    }
    if report.describe(cfg.text_errors):
        stats["messy text"] = report.describe(cfg.text_errors) + " (the training stream's rows: told as met)"
    return DataBundle(
        StreamingTrain(batches, env, workers, cfg.seed),
        eval_loader(cfg, env, valid),
        stats,
        eval_loader(cfg, env, test) if test is not None and len(test) else None,
    )
