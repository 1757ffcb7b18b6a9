"""Finding and loading a fill-mask model: a run directory's newest best/, a saved model directory, a Hub id, or an
ONNX export with the tokenizer and config of its model directory."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from mlm.common.cli import OUTPUTS_ROOT, UserError, looks_like_path
from mlm.common.files import TOKENIZER_FILES, has_tokenizer_files
from mlm.common.hub import LOAD_ERRORS, load_error
from mlm.inference.onnx import OnnxMaskedLM
from mlm.model.heads import usable_positions
from mlm.model.modeling import fresh_tensors

log = logging.getLogger("mlm")
_SANE_MAX_LENGTH = 1_000_000  # tokenizers without a limit report model_max_length as a huge sentinel


def find_default_model(root: str = OUTPUTS_ROOT) -> tuple[str, str]:
    """The newest best/ under root (where train_ddp.py writes its runs by default), and a note saying which."""
    runs = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            best = os.path.join(root, name, "best")
            if os.path.isfile(os.path.join(best, "config.json")):
                runs.append((max(os.path.getmtime(os.path.join(best, f)) for f in os.listdir(best)), best))
    if not runs:
        raise UserError(
            f"no trained model under {root}/ (train one with `torchrun --nproc_per_node=2 "
            "train_ddp.py`), or pass --model with a run directory, a saved model or a Hub id"
        )
    runs.sort(reverse=True)
    note = (
        f"the newest best/ under {root}/"
        if len(runs) == 1
        else f"the newest of {len(runs)} runs under {root}/; the others: "
        + ", ".join(os.path.dirname(p) for _, p in runs[1:])
    )
    return runs[0][1], note


def resolve_model_path(name: str, flag: str = "--model") -> str:
    """A run directory means its best/; a save_pretrained directory itself; anything else a Hub id."""
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return name
        if os.path.isfile(os.path.join(name, "best", "config.json")):
            return os.path.join(name, "best")
        if os.path.isfile(os.path.join(name, "trainer_state.json")):
            raise UserError(
                f"{flag} {name!r} is a resumable training checkpoint, not an exported model; pass the "
                "run directory (its best/ is used) or a directory written by save_pretrained"
            )
        raise UserError(
            f"{flag} {name!r} holds no model (no config.json, and no best/ of a training run); pass a "
            "run directory, a directory written by save_pretrained, or a Hub id"
        )
    if os.path.exists(name):
        raise UserError(f"{flag} {name!r} is a file; pass a run directory, a saved model directory or a Hub id")
    if looks_like_path(name):
        raise UserError(f"{flag} {name!r} does not exist; pass a run directory, a saved model directory or a Hub id")
    return name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use auto, cpu or cuda") from None


def check_tokenizer_files(path: str, flag: str = "--model") -> None:
    """A model directory must hold its tokenizer: without one, transformers would build an empty stand-in whose
    predictions are blank (train_ddp.py refuses the same directory)."""
    if os.path.isdir(path) and not has_tokenizer_files(path):
        raise UserError(
            f"{flag} {path!r} holds a model but no tokenizer ({', '.join(TOKENIZER_FILES)}); save it there with "
            "tokenizer.save_pretrained, or use a run's best/, which has one"
        )


def load_model(path: str, device: torch.device, flag: str = "--model") -> tuple[nn.Module, Any, Optional[str]]:
    """Tokenizer and masked LM from a resolved path or Hub id, and a warning when its MLM head is fresh
    (untrained): logged here, and shown by whoever shows the predictions (the web demo's page)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    check_tokenizer_files(path, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except LOAD_ERRORS as e:
        raise load_error("tokenizer", path, e) from None
    if tokenizer.mask_token_id is None:
        raise UserError(f"{flag} {path!r}: its tokenizer has no mask token, so it is not a masked LM")
    torch.manual_seed(0)  # a head missing from the checkpoint is initialised the same way on every run
    try:
        # fp32 stated, not left to the config's recorded dtype (transformers 5 would follow it): the scores are
        # those of the HF pipeline on the same fp32 weights.
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    except LOAD_ERRORS as e:
        raise load_error("model", path, e) from None
    fresh = fresh_tensors(info)
    warning = None
    if fresh:
        warning = (
            f"{path} has no trained weights for {', '.join(fresh[:3])}"
            f"{' ...' if len(fresh) > 3 else ''}; they are freshly initialised, so its predictions "
            "are not meaningful (an encoder without its MLM head?)"
        )
        log.warning(f"warning: {warning}")
    return model.to(device).eval(), tokenizer, warning


def load_onnx(path: str, onnx: str, flag: str = "--model") -> tuple[nn.Module, Any]:
    """An exported ONNX graph (python -m mlm.inference.export_onnx) with the tokenizer and config of its model
    directory."""
    from transformers import AutoConfig, AutoTokenizer

    check_tokenizer_files(path, flag)
    try:
        tokenizer, config = AutoTokenizer.from_pretrained(path, use_fast=True), AutoConfig.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise load_error("tokenizer and config", path, e) from None
    return OnnxMaskedLM(onnx, config), tokenizer


def max_input_length(config, tokenizer) -> int:
    limit = usable_positions(config)
    if 0 < tokenizer.model_max_length < _SANE_MAX_LENGTH:
        limit = min(limit, tokenizer.model_max_length)
    return limit
