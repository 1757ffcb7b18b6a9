"""Read a W&B offline run back through wandb's own files: the run-<id>.wandb transaction log.

The log is wandb's LevelDB-style record stream (a 7-byte header ':W&B' + magic + version, then 32 KiB blocks of
records with a 7-byte header: CRC32C, length, type FULL/FIRST/MIDDLE/LAST); each record is a
wandb_internal_pb2.Record, decoded with wandb's own protobuf classes. Tests only."""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the rest of a block too small for a header is padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class OfflineRun:
    run_id: str
    history: list[dict] = field(default_factory=list)  # one dict per wandb.log call, with "_step"
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    project: str = ""
    tags: list[str] = field(default_factory=list)


def read_run(run_dir: str) -> OfflineRun:
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run = OfflineRun(run_id=os.path.basename(path)[len("run-") : -len(".wandb")])
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            row["_step"] = r.history.step.num
            run.history.append(row)
        elif kind == "config":
            for item in r.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            run.artifacts.append(r.artifact.name)
        elif kind == "run":
            run.project, run.tags = r.run.project, list(r.run.tags)
            for item in r.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
    return run


def offline_runs(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*")))
