"""The Hugging Face Hub as seen from a failure: whether we are offline, and one wording of what could not load."""

from __future__ import annotations

import os

from safetensors import SafetensorError

from mlm.common.cli import UserError

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# What from_pretrained raises when a name cannot be loaded: the Hub's errors and a missing file are OSErrors,
# a config or a model type it does not know a ValueError or KeyError, a model class that needs a package an
# ImportError, damaged weights safetensors' own error. Anything else (an out-of-memory, a bug) keeps its type.
LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, SafetensorError)


def offline() -> bool:
    """Offline mode, as any of the three libraries' variables turns it on."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARIABLES)


def failure(e: Exception) -> str:
    """Why a Hub download failed, in words: offline mode, or the library's own first line."""
    if offline():
        return "the Hub is unreachable in offline mode and it is not cached"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def load_error(what: str, name: str, e: Exception) -> UserError:
    """A model, config or tokenizer that could not be loaded, from a local directory or the Hub."""
    why = failure(e) if not os.path.isdir(name) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return UserError(
        f"could not load the {what} {name!r} ({why}); give a Hub id you can reach or a directory "
        "written by save_pretrained"
    )
