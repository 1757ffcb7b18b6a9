"""best/: the plain Hugging Face export of the best model (invariant 7, docs/DESIGN.md), replaced atomically."""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch

from mlm.common.files import EXPORT_FILE, replace_dir, write_json_atomic, write_text_atomic


def export_pretrained(
    model: torch.nn.Module, tokenizer, path: str, metrics: dict[str, Any], texts: Optional[dict[str, str]] = None
) -> None:
    """save_pretrained weights (safetensors), config and tokenizer, the metrics that made it the best, and texts
    (file name -> content: the model card); AutoModelForMaskedLM.from_pretrained and pipeline("fill-mask") load
    it unchanged."""
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(os.path.join(tmp, "eval_results.json"), metrics)
        for name, text in (texts or {}).items():
            write_text_atomic(os.path.join(tmp, name), text)
        _keep_users_files(path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the previous best/ stays as it was
        raise
    replace_dir(tmp, path)


def _keep_users_files(path: str, tmp: str) -> None:
    """What a user put in best/ (files a run does not write) moves into the new export: replacing best/ whole
    must not delete it."""
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        source, target = os.path.join(path, name), os.path.join(tmp, name)
        if EXPORT_FILE.match(name) or os.path.lexists(target):
            continue
        shutil.copytree(source, target, symlinks=True) if os.path.isdir(source) and not os.path.islink(
            source
        ) else shutil.copy2(source, target, follow_symlinks=False)
