"""What every command line of the project shares: the one-line user error and its exit code, the parser that
raises it, quiet third-party logging and the versions a run records.

It imports nothing from the rest of the project, so any tool (training or inference) reports an error the same
way without importing the training config.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable
from typing import Any

from mlm.common import messages

# Exit codes (README, "Exit codes"): 0 done; 1 a failure (a traceback or one line naming an NCCL/gloo failure,
# or another rank's failure); 2 a user error, one line; 3 the loss stayed non-finite; 4 the disk filled up while
# writing; 5 stopped by --max_runtime (mlm/train/preemption.py) after saving a checkpoint; 128 + signal
# (143 SIGTERM, 130 SIGINT) stopped after saving a checkpoint.
EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_DISK_FULL = 0, 1, 2, 3, 4
OUTPUTS_ROOT = "outputs"  # default run directories are outputs/<model>-<dataset>; predict.py looks here too


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback, non-zero exit."""


class LocalUserError(UserError):
    """A user error that only this rank may have met (a bad row in its share of a stream, a wait of its own):
    reported by the rank that raised it, where other user errors are reported once, by rank 0."""


def parser_error(message: str, prog: str) -> UserError:
    """argparse's message as one line (a value typed on the command line may hold a newline, shown as \\n),
    and where to look for the fix."""
    flat = message.replace("\r", "\\r").replace("\n", "\\n")
    return UserError(f"{flat} (run `python {prog} --help` to list the options)")


class OneLineErrors:
    """For any argparse parser: one-line errors (the problem, and where to look for the fix) instead of the usage
    dump and exit."""

    prog: str

    def error(self, message: str) -> typing.NoReturn:
        raise parser_error(message, self.prog)


class Parser(OneLineErrors, argparse.ArgumentParser):
    """argparse with one-line errors."""


def report(error: UserError) -> int:
    """The one way a user error reaches the user: `error: ...` on stderr; returns the exit code."""
    message = str(error)
    message = messages.worker_error_line(message, type(error).__name__) or message
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def command_line(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a tool's main(): a UserError becomes one `error: ...` line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return report(e)

    return wrapper


def quiet_logging(level: int = logging.WARNING) -> None:
    """Our messages as plain lines at `level`; transformers' load reports and progress bars off (a fresh MLM
    head's report is noise here: where it matters, our own warning says so)."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on ("not installed" for datasets, needed only for Hub data)."""
    found = {}
    for name in ("torch", "transformers", "datasets", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def looks_like_path(name: str) -> bool:
    """A name meant as a local path rather than a Hub id (which is at most owner/name)."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1
