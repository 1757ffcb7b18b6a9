"""What only an exception's message tells, in one table.

Everything else is told apart by its type. These libraries raise one type for many causes: torch.distributed a
RuntimeError (or DistError) for every NCCL and gloo failure, torch.save a RuntimeError for a short write,
safetensors its own error with the OS error in the text, and a DataLoader worker's exception comes back with the
worker's traceback in its message. tests/test_messages.py holds an example message for every row.
"""

from __future__ import annotations

from typing import Optional

# A marker is matched as written, or, where it is in lower case after "~", in any case ("~timeout" matches
# "Timeout" and "TIMEOUT" too).
# A failure of the communication backend itself (NCCL, gloo), not of our code.
BACKEND = ("NCCL", "~[gloo", "gloo/")
# Another rank died or left: that rank (or torchrun) reports why, this one ends quietly.
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "ncclRemoteError",
    "remote process exited",
)
# A collective that waited past --ddp_timeout.
TIMED_OUT = ("Timed out", "~timeout")
# What usually fixes a backend failure, by what its message names; the first row that matches wins.
BACKEND_HINTS = (
    (
        ("/dev/shm", "~shared memory"),
        "/dev/shm is too small for NCCL: in Docker run with --ipc=host or --shm-size=1g, or set NCCL_SHM_DISABLE=1",
    ),
    (TIMED_OUT, "a rank waited longer than --ddp_timeout; raise it if a step or a save legitimately takes longer"),
    (
        ("ncclSystemError", "ncclUnhandledCudaError", "P2P"),
        "try NCCL_P2P_DISABLE=1 (GPUs without peer-to-peer access), and rerun with NCCL_DEBUG=INFO",
    ),
)
BACKEND_DEFAULT_HINT = "rerun with NCCL_DEBUG=INFO for the cause"
# A full disk (or a reached quota) where the writer raised no OSError: the text safetensors' Rust writer gives
# it, and what torch.save's zip writer raises instead (a size check that fails after a short write: it does not
# say why, but a write that came up short on a local disk is a full one).
DISK_FULL = (
    "No space left on device",
    "os error 28",
    "Disk quota exceeded",
    "os error 122",
    "unexpected pos",
    "file write failed",
)
# torch re-raises a DataLoader worker's exception with the worker's traceback in the message.
WORKER_TRACEBACK = "\nOriginal Traceback"


def names(text: str, markers: tuple[str, ...]) -> bool:
    lower = text.lower()
    return any(m[1:] in lower if m.startswith("~") else m in text for m in markers)


def backend_hint(text: str) -> str:
    return next((hint for markers, hint in BACKEND_HINTS if names(text, markers)), BACKEND_DEFAULT_HINT)


def worker_error_line(message: str, type_name: str) -> Optional[str]:
    """The error line of an exception re-raised from a DataLoader worker (its last line); None for any other."""
    if WORKER_TRACEBACK not in message:
        return None
    return message.rstrip().rsplit(f"{type_name}: ", 1)[-1]
