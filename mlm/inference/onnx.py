"""An ONNX export run by onnxruntime behind the call FillMask makes. onnx and onnxruntime are optional extras
(requirements-extras.txt)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlm.common.cli import UserError


class LogitsOnly(nn.Module):
    """The masked LM as a function of (input_ids, attention_mask) returning only the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def require_extras() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"ONNX export needs the optional packages onnx and onnxruntime ({e.name} is missing); "
            "pip install -r requirements-extras.txt"
        ) from None


@dataclass
class _Output:
    logits: torch.Tensor


class OnnxMaskedLM(nn.Module):
    """An exported graph behind the masked LM call that FillMask makes: model(input_ids=, attention_mask=)
    -> .logits. Runs on the CPU with onnxruntime."""

    def __init__(self, path: str, config: Any):
        super().__init__()
        require_extras()
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise UserError(
                f"--onnx {path!r} does not exist; export one with python -m mlm.inference.export_onnx MODEL_DIR {path}"
            )
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(
                f"--onnx {path!r} could not be loaded by onnxruntime ({type(e).__name__}); export it "
                "again with python -m mlm.inference.export_onnx"
            ) from None
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input_ids", "attention_mask"}:
            raise UserError(
                f"--onnx {path!r} takes {sorted(names)}, not input_ids and attention_mask; export it "
                "with python -m mlm.inference.export_onnx"
            )
        self.config = config
        self.device = torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Output:
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return _Output(torch.from_numpy(self.session.run(["logits"], feeds)[0]))
