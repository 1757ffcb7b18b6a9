"""Texts (mlm.data.sources) -> one flat token stream per split (cached on disk) -> fixed-length examples -> DataLoaders.

The cache holds the tokenised stream and the per-text lengths, keyed by the tokenizer (a hash of its full
definition), the source's content fingerprint and the mode. Chunking into `max_seq_length` examples is a
zero-copy view of the stream, so one cache serves every sequence length. A batch is one fancy-index into the
array: no per-example Python work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mlm.common.cli import UserError
from mlm.common.distributed import DistEnv, leads, main_process_first
from mlm.common.files import sha256_file
from mlm.common.processes import pid_alive, process_start
from mlm.config import TrainConfig, default_cache_dir
from mlm.data.cleaning import TextReport
from mlm.data.sources import build_source, holdout_count, no_text_error
from mlm.data.text import Framing, frame, plain_backend, text_encoder

log = logging.getLogger("mlm")
CACHE_VERSION = 3  # 3: raw token files written as the texts are read, a split a slice of one (2: + test split)
TOKENIZE_BATCH = 8192
PROGRESS_LOG_SECONDS = 60  # without a terminal, a progress line this often on a long preparation


# ---------------------------------------------------------------------- tokenisation and cache
@dataclass(frozen=True)
class TokenStream:
    """One split: every text's tokens back to back, and each text's token count (read from the cache, both are
    memory maps: a rank holds no split in RAM)."""

    tokens: np.ndarray  # [N] uint16 or int32
    lengths: np.ndarray  # [texts] int64


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's complete definition (vocabulary, normaliser, pre-tokeniser)."""
    return hashlib.sha256(plain_backend(tokenizer).to_str().encode()).hexdigest()


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32)


def tokenize_texts(tokenizer, texts: Sequence[str]) -> TokenStream:
    """Batched fast tokenisation without special tokens; concatenated into one array."""
    encoder = text_encoder(tokenizer)
    dtype = token_dtype(tokenizer)
    pieces, lengths = [], []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        ids = encoder.ids(texts[start : start + TOKENIZE_BATCH])
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        pieces.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(n.sum())))
        lengths.append(n)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64))


def cache_key(tokenizer_fp: str, source_fp: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "tokenizer": tokenizer_fp, "source": source_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _PartWriter:
    """One part's tokens and per-text lengths, appended to two raw files as its batches are tokenised."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        self.tokens = open(os.path.join(directory, f"{name}.tokens.bin"), "wb")
        self.lengths = open(os.path.join(directory, f"{name}.lengths.bin"), "wb")
        self.n_tokens = self.n_texts = 0

    def append(self, stream: TokenStream) -> None:
        self.tokens.write(np.ascontiguousarray(stream.tokens, dtype=self.dtype).tobytes())
        self.lengths.write(np.ascontiguousarray(stream.lengths, dtype=np.int64).tobytes())
        self.n_tokens += int(stream.tokens.size)
        self.n_texts += int(stream.lengths.size)

    def close(self) -> None:
        for fh in (self.tokens, self.lengths):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def layout(self, texts: tuple[int, int], tokens: tuple[int, int]) -> dict:
        return {"file": self.name, "texts": list(texts), "tokens": list(tokens)}


def _memmap(path: str, dtype: np.dtype, start: int, end: int) -> np.ndarray:
    """Elements [start, end) of a raw file, memory-mapped (numpy cannot map an empty range)."""
    if end <= start:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start * dtype.itemsize, shape=(end - start,))


def _prefix_tokens(path: str, texts: int) -> int:
    """Tokens in the first `texts` texts of a lengths file, summed a block at a time."""
    lengths, total, block = _memmap(path, np.dtype(np.int64), 0, texts), 0, 1 << 22
    for start in range(0, texts, block):
        total += int(lengths[start : start + block].sum())
    return total


class PrepProgress:
    """How far the preparation is, in characters of text against the source's size: a tqdm bar with MB/s and an
    ETA on a terminal (after a few seconds, so a quick preparation shows none), else a log line every minute."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()
        self.last_log, self.bar, self.description = self.t0, None, description
        import sys

        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, unit="B", unit_scale=True, desc="tokenising", delay=2, dynamic_ncols=True, leave=False
            )

    def advance(self, chars: int) -> None:
        self.done += chars
        if self.bar is not None:
            self.bar.update(chars)
            return
        now = time.perf_counter()
        if now - self.last_log >= PROGRESS_LOG_SECONDS:
            self.last_log = now
            rate = self.done / max(now - self.t0, 1e-9)
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            log.info(
                f"tokenising {self.description}: {self.done / 1e6:,.0f} of about {self.total / 1e6:,.0f} MB, "
                f"{rate / 1e6:.1f} MB/s, about {left / 60:.0f} min left"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prefetched(batches: Iterator[list[str]], depth: int = 2) -> Iterator[list[str]]:
    """batches read by a thread ahead of the consumer: reading and cleaning (Python) overlap tokenising (Rust,
    without the GIL). An exception in the reader is raised here, in order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def read() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put(e)

    reader = threading.Thread(target=read, name="mlm-read-texts", daemon=True)
    reader.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _build_cache(tmp: str, source, tokenizer, builder: Callable, check_stop: Callable[[], None]) -> dict:
    """Every part of source tokenised batch by batch into raw files in tmp; the splits' layout over them.
    check_stop() runs after each batch and raises to stop (a signal: Ctrl-C, a platform's SIGTERM)."""
    dtype, layout = token_dtype(tokenizer), {}
    progress = PrepProgress(source.size, source.description)
    try:
        for part, batches in source.parts.items():
            name = "pool" if part == "train" and source.holdout else part
            writer = _PartWriter(tmp, name, dtype)
            try:
                for texts in _prefetched(batches()):
                    writer.append(builder(tokenizer, texts))
                    progress.advance(sum(map(len, texts)))
                    check_stop()
            finally:
                writer.close()
            texts, tokens = (0, writer.n_texts), (0, writer.n_tokens)
            if name != "pool":
                layout[part] = writer.layout(texts, tokens)
                continue
            n_val = holdout_count(writer.n_texts, source.holdout)
            cut = _prefix_tokens(os.path.join(tmp, "pool.lengths.bin"), n_val)
            layout["validation"] = writer.layout((0, n_val), (0, cut))
            layout["train"] = writer.layout((n_val, writer.n_texts), (cut, writer.n_tokens))
    finally:
        progress.close()
    return {"dtype": dtype.name, "layout": layout}


def _entry_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".bin"))


def _file_record(path: str) -> dict[str, dict]:
    """Each raw file of an entry: its size and SHA-256, written into meta.json when the entry is complete."""
    return {
        n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": sha256_file(os.path.join(path, n))}
        for n in _entry_files(path)
    }


def _damage(path: str, meta: dict) -> Optional[str]:
    """What is wrong with a complete entry's files (a truncated or overwritten one), or None. Entries written
    before files were recorded are taken as they are."""
    recorded = meta.get("files")
    if recorded is None:
        return None
    for name, want in recorded.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != want["bytes"]:
            return f"{name} holds {os.path.getsize(file)} bytes, not the {want['bytes']} written"
        if sha256_file(file) != want["sha256"]:
            return f"{name} has changed since it was written"
    return None


def _remove_abandoned_builds(cache_dir: str) -> None:
    """Temporary entries of preparations that died (killed, or the machine went down): removed when their
    process is gone from this host, or, from another host, after a day."""
    for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        tmp = os.path.join(cache_dir, name)
        if not (name.startswith(".tmp-") and os.path.isdir(tmp)):
            continue
        try:
            with open(os.path.join(tmp, "owner.json")) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            owner = {}
        here = owner.get("host") == socket.gethostname()
        gone = here and not pid_alive(owner.get("pid", -1), owner.get("pid_start"))
        stale = time.time() - os.path.getmtime(tmp) > 86400
        if gone or (not here and stale):
            log.warning(f"removing {tmp}: an unfinished preparation of tokenised data whose process is gone")
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: str, verify: bool = True) -> Optional[tuple[dict[str, TokenStream], dict]]:
    """(streams, meta) of a cache entry, or None: each split a memory map of its slice of a part's files. verify:
    a damaged entry is removed (and so built again), with a line saying so."""
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    with open(os.path.join(path, "meta.json")) as fh:
        meta = json.load(fh)
    damage = _damage(path, meta) if verify else None
    if damage:
        log.warning(f"warning: the cached tokens in {path} are damaged ({damage}); preparing them again")
        shutil.rmtree(path, ignore_errors=True)
        return None
    dtype, streams = np.dtype(meta["dtype"]), {}
    for split, where in meta["layout"].items():
        base = os.path.join(path, where["file"])
        streams[split] = TokenStream(
            _memmap(f"{base}.tokens.bin", dtype, *where["tokens"]),
            _memmap(f"{base}.lengths.bin", np.dtype(np.int64), *where["texts"]),
        )
    return streams, meta


def _go_on() -> None:
    pass


def load_token_streams(
    cfg: TrainConfig,
    tokenizer,
    cache_dir: str,
    builder: Callable = tokenize_texts,
    check_stop: Callable[[], None] = _go_on,
    verify: bool = True,
) -> tuple[dict[str, TokenStream], bool, TextReport]:
    """Token streams for train and validation (and test, when the source has one), from the cache or built into
    it. The texts are read, tokenised and written a batch at a time (builder(tokenizer, texts) -> TokenStream),
    so preparing needs the same memory for any corpus size; the entry is a temporary sibling until complete, then
    renamed; check_stop() may raise between batches to stop, and the temporary entry is then removed. Returns
    (streams, hit, what --text_errors replaced or skipped when the texts were read, kept with the cache for later
    hits). verify: check a cached entry's files against their recorded sizes and checksums (the rank that
    prepares does; the ranks that read what it checked or built skip the hashing)."""
    source = build_source(cfg)
    path = os.path.join(cache_dir, cache_key(tokenizer_fingerprint(tokenizer), source.fingerprint))
    cached = _read_cache(path, verify)
    if cached is not None:
        streams, meta = cached
        return streams, True, TextReport(meta.get("text_errors", {}))
    if cfg.preprocessing_num_workers:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.preprocessing_num_workers)
    t0 = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    _remove_abandoned_builds(cache_dir)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
    try:
        with open(os.path.join(tmp, "owner.json"), "w") as fh:  # whose preparation this is, for the next run
            start = process_start(os.getpid())
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": start and start[1]}, fh)
        meta = _build_cache(tmp, source, tokenizer, builder, check_stop)
        tokens = {split: where["tokens"][1] - where["tokens"][0] for split, where in meta["layout"].items()}
        if tokens["train"] == 0:  # checked before caching, so an empty stream is never cached
            raise no_text_error(source.description)
        meta.update(
            {
                "version": CACHE_VERSION,
                "source": source.description,
                "fingerprint": source.fingerprint,
                "splits": sorted(meta["layout"]),
                "build_seconds": round(time.perf_counter() - t0, 3),
                "tokens": tokens,
                "text_errors": source.report.counts,
                "files": _file_record(tmp),  # verified before every use
            }
        )
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "meta.json")):  # not a lost race with another writer
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    streams, _ = _read_cache(path, verify=False)  # its checksums were taken from these files a moment ago
    return streams, False, source.report


# ---------------------------------------------------------------------- datasets
class ChunkDataset(torch.utils.data.Dataset):
    """Packed examples: the stream cut into bodies of max_seq_length - 2 tokens, framed by [CLS] ... [SEP].
    The final remainder shorter than one body is dropped (and reported)."""

    def __init__(self, stream: TokenStream, max_seq_length: int, cls_id: int, sep_id: int, limit: Optional[int] = None):
        body = max_seq_length - 2
        n = stream.tokens.size // body
        self.available = int(n)  # examples before --max_*_samples capped them
        n = min(n, limit) if limit else n
        self.bodies = stream.tokens[: n * body].reshape(n, body)
        self.max_seq_length, self.cls_id, self.sep_id = max_seq_length, cls_id, sep_id
        self.dropped_tokens = int(stream.tokens.size % body)  # the chunking remainder

    def __len__(self) -> int:
        return self.bodies.shape[0]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        ids = frame(self.bodies[idx], self.cls_id, self.sep_id)
        return {"input_ids": torch.from_numpy(ids), "index": torch.from_numpy(idx)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class LineDataset(torch.utils.data.Dataset):
    """One example per non-empty text, truncated to max_seq_length; a batch is padded to its longest
    example, rounded up to a multiple of 8 (tensor-core friendly), or with fixed_width always to
    max_seq_length (--torch_compile: one shape on every rank, so no rank recompiles while the others wait)."""

    def __init__(
        self,
        stream: TokenStream,
        max_seq_length: int,
        framing: Framing,
        limit: Optional[int] = None,
        fixed_width: bool = False,
    ):
        offsets = np.concatenate([[0], np.cumsum(stream.lengths)])
        keep = np.nonzero(stream.lengths > 0)[0]
        self.available = int(keep.size)  # examples before --max_*_samples capped them
        keep = keep[:limit] if limit else keep
        self.starts, self.lengths = offsets[keep], np.minimum(stream.lengths[keep], max_seq_length - 2)
        self.tokens = stream.tokens
        self.cls_id, self.sep_id, self.pad_id = framing.cls_id, framing.sep_id, framing.pad_id
        self.fixed_width = max_seq_length if fixed_width else None
        self.dropped_tokens = int(stream.lengths[keep].sum() - self.lengths.sum())

    def __len__(self) -> int:
        return self.starts.size

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        lens = self.lengths[idx]
        width = self.fixed_width or -(-(int(lens.max()) + 2) // 8) * 8
        ids = np.full((idx.size, width), self.pad_id, dtype=np.int64)
        ids[:, 0] = self.cls_id
        for row, (start, n) in enumerate(zip(self.starts[idx], lens)):
            ids[row, 1 : n + 1] = self.tokens[start : start + n]
            ids[row, n + 1] = self.sep_id
        attention = (np.arange(width)[None, :] < (lens[:, None] + 2)).astype(np.int64)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attention),
            "index": torch.from_numpy(idx),
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


# ---------------------------------------------------------------------- samplers and loaders
class GlobalOrderSampler(DistributedSampler):
    """DistributedSampler with one rank's share laid out so that a global step's examples do not depend on the
    world size, and that starts part-way through an epoch without loading the skipped batches.

    The epoch's order is DistributedSampler's permutation (seeded by seed + epoch, the same on every rank), and
    its k-th example goes to rank k % W as there, in that rank's k // W-th row: rank r's micro-batch m (of b rows)
    holds the positions (m * b + i) * W + r, so optimizer step s (A micro-batches per rank) covers exactly the
    positions [s * G, (s + 1) * G) with G = b * W * A, whichever (b, W, A) make up G. Unlike DistributedSampler no
    example is repeated to even out the ranks (that would make the last step depend on W): a rank whose share ends
    early gets empty rows instead (EpochBatches). start: positions already trained in this epoch (a resume)."""

    def __init__(self, dataset, world_size: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.n, self.world_size, self.start = len(dataset), world_size, 0

    def order(self) -> torch.Tensor:
        """The epoch's order of example indices: 8 bytes an example while it is drawn, and only this rank's
        share of it (from start on) becomes a Python list."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start + self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.n, self.world_size))


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous, disjoint shards covering every example once: no sampler padding, so evaluation is exact."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def _identity(batch):
    return batch


def fill_batch(raw: dict[str, torch.Tensor], rows: int, cls_id: int, sep_id: int) -> dict[str, torch.Tensor]:
    """raw grown to `rows` examples by empty ones ([CLS] then [SEP]s, index -1): special tokens only, so never
    masked, and they add nothing to the loss or its gradient. For a fixed batch shape (--torch_compile)."""
    missing = rows - raw["input_ids"].shape[0]
    if missing <= 0:
        return raw
    width = raw["input_ids"].shape[1]
    empty = torch.full((missing, width), sep_id, dtype=raw["input_ids"].dtype)
    empty[:, 0] = cls_id
    out = {
        "input_ids": torch.cat([raw["input_ids"], empty]),
        "index": torch.cat([raw["index"], torch.full((missing,), -1, dtype=raw["index"].dtype)]),
    }
    if "attention_mask" in raw:  # [CLS] [SEP] attended: a row with nothing to attend to would give NaNs
        attention = torch.zeros((missing, width), dtype=raw["attention_mask"].dtype)
        attention[:, :2] = 1
        out["attention_mask"] = torch.cat([raw["attention_mask"], attention])
    return out


class EpochBatches:
    """The training side of fit() for a map-style dataset: an epoch's groups of micro-batches, from any point.

    Every rank yields micro_per_epoch = ceil(n / (b * W)) micro-batches per epoch; where its share of the
    epoch (GlobalOrderSampler) ends early, the rest are empty rows (fill_batch), which add nothing to the loss,
    so that every rank takes the same steps. fixed_rows: fill every partial batch up to the batch size, so that
    every micro-batch has the same shape (--torch_compile)."""

    def __init__(
        self,
        loader: DataLoader,
        sampler: GlobalOrderSampler,
        batch_size: int,
        fixed_rows: bool = False,
        special_ids: tuple[int, int] = (0, 0),
    ):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.micro_per_epoch = math.ceil(sampler.n / (batch_size * sampler.world_size))
        self.fixed_rows, self.special_ids = fixed_rows, special_ids

    def _empty(self) -> dict[str, torch.Tensor]:
        """A micro-batch of empty rows, shaped like the dataset's (for a rank whose share has ended)."""
        proto = self.loader.dataset.__getitems__([0])
        return fill_batch(
            {k: v[:0] for k, v in proto.items()}, self.batch_size if self.fixed_rows else 1, *self.special_ids
        )

    def micro_from(self, offset: int) -> int:
        """Micro-batches per rank that train an epoch's examples from position `offset` on."""
        return math.ceil((self.sampler.n - offset) / (self.batch_size * self.sampler.world_size))

    def fraction(self, offset: int, micro_done: int) -> float:
        """How much of the epoch is trained after micro_done micro-batches from position offset."""
        return min(1.0, (offset + micro_done * self.batch_size * self.sampler.world_size) / max(self.sampler.n, 1))

    def groups(
        self, epoch: int, micro_done: int, accumulation: int, offset: int = 0
    ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The rest of an epoch: offset examples of it trained before this run's layout began (a resume with
        another global batch), then micro_done micro-batches of this layout."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = offset + micro_done * self.batch_size * self.sampler.world_size
        left = self.micro_from(offset) - micro_done
        batches = itertools.islice(itertools.chain(iter(self.loader), iter(self._empty, None)), max(left, 0))
        if self.fixed_rows:
            batches = (fill_batch(b, self.batch_size, *self.special_ids) for b in batches)
        while group := list(itertools.islice(batches, accumulation)):
            yield group

    def state_dict(self) -> dict:
        return {}  # the position is (epoch, micro-batches done), which TrainState holds

    def load_state_dict(self, d: dict) -> None:
        if d:
            raise UserError(
                "the checkpoint was saved by a --streaming run; resume it with --streaming, or start "
                "afresh with --overwrite_output_dir"
            )


class TrainBatches(Protocol):
    """The training side of fit(): EpochBatches here, StreamingTrain for a stream."""

    micro_per_epoch: Optional[int]  # None for a stream (its length is unknown)

    def groups(
        self, epoch: int, micro_done: int, accumulation: int, offset: int = 0
    ) -> Iterator[list[dict[str, Any]]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


@dataclass
class DataBundle:
    train: TrainBatches
    eval_loader: DataLoader
    stats: dict
    test_loader: Optional[DataLoader] = None  # the test split, evaluated exactly like validation on best/


def build_datasets(cfg: TrainConfig, streams: dict[str, TokenStream], tokenizer):
    ids = dict(cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    if None in ids.values():
        raise UserError("the tokenizer has no [CLS]/[SEP] tokens; use a BERT-style tokenizer")
    if cfg.line_by_line:
        framing = Framing(pad_id=tokenizer.pad_token_id, **ids)
        make = lambda s, limit, train: LineDataset(
            s, cfg.max_seq_length, framing, limit=limit, fixed_width=train and cfg.torch_compile
        )
    else:
        make = lambda s, limit, train: ChunkDataset(s, cfg.max_seq_length, limit=limit, **ids)
    datasets = {
        split: make(stream, cfg.max_train_samples if split == "train" else cfg.max_eval_samples, split == "train")
        for split, stream in streams.items()
    }
    for split, ds in datasets.items():
        if len(ds) == 0 and split != "test":  # an empty test split is only not evaluated (the banner says so)
            n = int(streams[split].tokens.size)
            if split == "validation" and streams[split].lengths.size == 0:
                raise UserError(
                    "the validation split has no rows: a held-out split is --validation_split_percentage "
                    f"({cfg.validation_split_percentage}) percent of the training texts, rounded down; raise it, "
                    "or give --validation_file"
                )
            raise UserError(
                f"the {'training' if split == 'train' else split} data gives no example of "
                f"{cfg.max_seq_length} tokens (it has {n} tokens); give a file that holds more text, "
                "or a smaller --max_seq_length"
            )
    return datasets


def eval_stats(valid, test, streams: dict[str, TokenStream], max_seq_length: int) -> dict[str, str]:
    """The banner's lines for the evaluated splits."""
    stats = {
        "eval": f"{len(valid)} examples from {streams['validation'].tokens.size} tokens; "
        f"{valid.dropped_tokens} dropped by chunking"
    }
    if "test" in streams:
        stats["test"] = (
            f"{len(test)} examples from {streams['test'].tokens.size} tokens, evaluated on best/ at the end"
            if len(test)
            else f"none: the test split gives no example of {max_seq_length} "
            f"tokens ({streams['test'].tokens.size} tokens), so it is not evaluated"
        )
    return stats


def eval_loader(cfg: TrainConfig, env: DistEnv, valid) -> DataLoader:
    # Own generators: creating a DataLoader iterator draws a seed from the global RNG, which would shift the
    # dropout stream (and break exact resume) every time an epoch or an evaluation starts.
    # No pin_memory: batches are masked on the host, and prepare_batch copies the result from pinned memory.
    return DataLoader(
        valid,
        batch_size=cfg.per_device_eval_batch_size,
        sampler=eval_shard(len(valid), env.rank, env.world_size),
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_data(cfg: TrainConfig, env: DistEnv, tokenizer, check_stop: Callable[[], None] = _go_on) -> DataBundle:
    """The cached path: every split tokenised once (on a leader per node), then chunked and loaded. check_stop:
    as for load_token_streams."""
    cache_dir = cfg.data_cache_dir or default_cache_dir()
    t0 = time.perf_counter()
    per_node = cfg.cache_scope == "node"
    streams, hit, report = main_process_first(
        env,
        lambda: load_token_streams(cfg, tokenizer, cache_dir, check_stop=check_stop, verify=leads(env, per_node)),
        per_node=per_node,
    )
    built = build_datasets(cfg, streams, tokenizer)
    train, valid, test = built["train"], built["validation"], built.get("test")
    sampler = GlobalOrderSampler(train, env.world_size, env.rank, cfg.seed)
    train_loader = DataLoader(
        train,
        batch_size=cfg.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=_identity,
        num_workers=cfg.loader_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    stats = {
        "train": f"{len(train)} examples of {cfg.max_seq_length} from {streams['train'].tokens.size} tokens; "
        f"{train.dropped_tokens} dropped by chunking",
        **eval_stats(valid, test, streams, cfg.max_seq_length),
        "data": f"{'cache hit' if hit else 'tokenised and cached'} in {time.perf_counter() - t0:.2f} s",
    }
    if report.describe(cfg.text_errors):
        stats["messy text"] = report.describe(cfg.text_errors)
    batches = EpochBatches(
        train_loader,
        sampler,
        cfg.per_device_train_batch_size,
        fixed_rows=cfg.torch_compile,
        special_ids=(tokenizer.cls_token_id, tokenizer.sep_token_id),
    )
    return DataBundle(
        batches,
        eval_loader(cfg, env, valid),
        stats,
        eval_loader(cfg, env, test) if test is not None and len(test) else None,
    )
