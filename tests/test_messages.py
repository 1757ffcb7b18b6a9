"""What only a message tells (mlm/common/messages.py): an example message for every row of the table, each
read the way the code that uses the row reads it, and one that must not match."""

from __future__ import annotations

import errno
import re

import pytest
import torch.distributed as dist

from mlm.common import messages
from mlm.common.cli import UserError, report
from mlm.common.distributed import describe_failure, is_peer_failure
from mlm.common.files import is_disk_full


def test_every_row_has_an_example_here():
    """A row added to a table without an example below fails here."""
    rows = {
        "BACKEND": messages.BACKEND,
        "LOST_PEER": messages.LOST_PEER,
        "TIMED_OUT": messages.TIMED_OUT,
        "DISK_FULL": messages.DISK_FULL,
    }
    examples = {"BACKEND": BACKEND, "LOST_PEER": LOST_PEER, "TIMED_OUT": TIMED_OUT, "DISK_FULL": DISK_FULL}
    for name, markers in rows.items():
        assert [m for m, _ in examples[name]] == list(markers), name
    assert len(HINTS) == len(messages.BACKEND_HINTS)


BACKEND = [
    ("NCCL", "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error, NCCL version 2.21.5"),
    ("~[gloo", "[Gloo] Rank 1 is connected to 0 peer ranks. Expected number of connected peer ranks is : 1"),
    ("gloo/", "third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms"),
]


@pytest.mark.parametrize("marker, text", BACKEND, ids=[m for m, _ in BACKEND])
def test_a_backend_failure_is_one_line(marker, text):
    line = describe_failure(RuntimeError(text), 3)
    assert line.startswith("rank 3: the communication backend failed: ") and "\n" not in line
    without = re.sub(re.escape(marker.lstrip("~")), "xx", text, flags=re.I if marker.startswith("~") else 0)
    assert describe_failure(RuntimeError(without), 3) is None


LOST_PEER = [
    ("Connection closed by peer", "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer"),
    ("Connection reset by peer", "Connection reset by peer"),
    ("Broken pipe", "[../third_party/gloo/gloo/transport/tcp/pair.cc:589] Write error: Broken pipe"),
    ("ncclRemoteError", "NCCL error in: ProcessGroupNCCL.cpp:2042, ncclRemoteError: a peer went away"),
    ("remote process exited", "NCCL communicator was aborted: remote process exited"),
]


@pytest.mark.parametrize("marker, text", LOST_PEER, ids=[m for m, _ in LOST_PEER])
def test_a_lost_peer_ends_this_rank_quietly(marker, text):
    assert is_peer_failure(RuntimeError(text)) and is_peer_failure(dist.DistError(text))
    assert not is_peer_failure(ValueError(text))  # not from a collective: a bug of ours
    assert not is_peer_failure(RuntimeError(text.replace(marker, "")))


TIMED_OUT = [
    ("Timed out", "Timed out waiting 1800000ms for send operation to complete"),
    ("~timeout", "Watchdog caught collective operation Timeout: WorkNCCL(SeqNum=3)"),
]
HINTS = [
    ("NCCL error: Error while creating shared memory segment /dev/shm/nccl-x (size 9637888)", "--shm-size=1g"),
    ("NCCL watchdog: Timed out after 1800000 ms", "raise it if a step"),
    ("NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO), ncclUnhandledCudaError", "NCCL_P2P_DISABLE=1"),
]


@pytest.mark.parametrize("marker, text", TIMED_OUT, ids=[m for m, _ in TIMED_OUT])
def test_a_timeout_is_read_as_one(marker, text):
    assert messages.names(text, messages.TIMED_OUT)
    assert messages.names(text.upper(), messages.TIMED_OUT) is marker.startswith("~")  # "~": in any case
    assert not messages.names(text.replace(marker.lstrip("~"), "").replace("Timeout", ""), messages.TIMED_OUT)
    assert "--ddp_timeout" in describe_failure(RuntimeError("NCCL " + text), 0)


@pytest.mark.parametrize("text, hint", HINTS)
def test_each_backend_failure_gets_its_hint(text, hint):
    assert hint in describe_failure(RuntimeError(text), 0)
    assert messages.BACKEND_DEFAULT_HINT in describe_failure(RuntimeError("NCCL error: invalid usage"), 0)


DISK_FULL = [
    (
        "No space left on device",
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    ),
    ("os error 28", "Error while serializing: I/O error: (os error 28)"),
    ("Disk quota exceeded", "Error while serializing: Disk quota exceeded"),
    ("os error 122", "I/O error: (os error 122)"),
    ("unexpected pos", "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    (
        "file write failed",
        "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed",
    ),
]


@pytest.mark.parametrize("marker, text", DISK_FULL, ids=[m for m, _ in DISK_FULL])
def test_a_full_disk_is_read_from_a_writer_that_raises_no_oserror(marker, text):
    assert is_disk_full(RuntimeError(text))
    assert not is_disk_full(RuntimeError(text.replace(marker, "")))
    assert not is_disk_full(OSError(errno.EACCES, text))  # an OSError is read by its errno, not its text


def test_an_error_from_a_loader_worker_shows_its_own_line(capsys):
    wrapped = UserError(
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmlm.common.cli.UserError: train.jsonl line 7: not JSON; fix the row\n'
    )
    assert report(wrapped) == 2
    assert capsys.readouterr().err == "error: train.jsonl line 7: not JSON; fix the row\n"
    assert messages.worker_error_line("plain message", "UserError") is None
