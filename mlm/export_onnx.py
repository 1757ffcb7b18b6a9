"""Export a fill-mask model to ONNX, checked against PyTorch with onnxruntime.

    python -m mlm.export_onnx MODEL_DIR OUT.onnx [--opset 17] [--atol 1e-4]
    python predict.py --model MODEL_DIR --onnx OUT.onnx "Paris is the [MASK] of France."

MODEL_DIR is a run directory (its best/ is used), a saved model directory or a Hub id. The graph takes
input_ids and attention_mask ([batch, sequence], int64, both axes dynamic) and returns the vocabulary logits
([batch, sequence, vocab], float32). The check runs PyTorch and onnxruntime on predict.py's sample sentences at
a batch size and lengths other than the export's and reports the largest absolute logit difference; above
--atol it is an error and the file is not kept. onnx and onnxruntime are optional extras
(requirements-extras.txt).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import UserError, command_line


class _Logits(nn.Module):
    """The masked LM as a function of (input_ids, attention_mask) returning only the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _require_extras() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs the optional packages onnx and onnxruntime ({e.name} is missing); "
                        "pip install -r requirements-extras.txt") from None


def export(model: nn.Module, path: str, opset: int = 17) -> None:
    """Write the ONNX graph atomically (a temporary file renamed into place). A copy is traced: the exporter
    leaves the model it traces changed (measured: logits off by ~2.5 on longer inputs afterwards), and the
    check below needs the untouched model."""
    model = copy.deepcopy(model).eval().to("cpu")
    example = torch.tensor([[101, 2023, 103, 1012, 102]]) % model.config.vocab_size
    tmp = f"{path}.tmp"
    with torch.no_grad():
        torch.onnx.export(_Logits(model), (example, torch.ones_like(example)), tmp, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={name: {0: "batch", 1: "sequence"}
                                        for name in ("input_ids", "attention_mask", "logits")})
    os.replace(tmp, path)


@dataclass
class _Output:
    logits: torch.Tensor


class OnnxMaskedLM(nn.Module):
    """An exported graph behind the masked LM call that FillMask makes: model(input_ids=, attention_mask=)
    -> .logits. Runs on the CPU with onnxruntime."""

    def __init__(self, path: str, config: Any):
        super().__init__()
        _require_extras()
        import onnxruntime as ort
        if not os.path.isfile(path):
            raise UserError(f"--onnx {path!r} does not exist; export one with python -m mlm.export_onnx MODEL_DIR "
                            f"{path}")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"--onnx {path!r} could not be loaded by onnxruntime ({type(e).__name__}); export it "
                            "again with python -m mlm.export_onnx") from None
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input_ids", "attention_mask"}:
            raise UserError(f"--onnx {path!r} takes {sorted(names)}, not input_ids and attention_mask; export it "
                            "with python -m mlm.export_onnx")
        self.config = config
        self.device = torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Output:
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return _Output(torch.from_numpy(self.session.run(["logits"], feeds)[0]))


def check(model: nn.Module, tokenizer, path: str, config: Any) -> float:
    """Largest absolute logit difference between PyTorch and onnxruntime on the sample sentences, padded to
    one batch (so the check also covers padding and other shapes than the export's)."""
    from .fill_mask import SAMPLE_SENTENCES
    texts = [s.replace("[MASK]", tokenizer.mask_token) for s in SAMPLE_SENTENCES]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = _Logits(model.eval())(enc["input_ids"], enc["attention_mask"])
    got = OnnxMaskedLM(path, config)(enc["input_ids"], enc["attention_mask"]).logits
    keep = enc["attention_mask"].bool()  # logits at padding positions are never read
    return float((ref[keep] - got[keep]).abs().max())


@command_line
def main(argv: list[str] | None = None) -> int:
    from .config import Parser
    from .fill_mask import SAMPLE_SENTENCES, load_model, resolve_model_path
    p = Parser(prog="python -m mlm.export_onnx", description="Export a fill-mask model to ONNX and check it "
               "against PyTorch with onnxruntime.")
    p.add_argument("model_dir", help="Run directory (its best/), saved model directory or Hub id.")
    p.add_argument("out", help="The .onnx file to write.")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17).")
    p.add_argument("--atol", type=float, default=1e-4, help="Largest logit difference accepted (default 1e-4).")
    args = p.parse_args(argv)
    _require_extras()
    if not args.out.endswith(".onnx"):
        raise UserError(f"{args.out!r}: name the output file *.onnx")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UserError(f"{args.out!r}: the directory {parent!r} does not exist")
    model, tokenizer = load_model(resolve_model_path(args.model_dir, "model_dir"), torch.device("cpu"),
                                  "model_dir")
    export(model, args.out, args.opset)
    diff = check(model, tokenizer, args.out, model.config)
    print(f"exported {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, opset {args.opset}); "
          f"onnxruntime vs PyTorch on {len(SAMPLE_SENTENCES)} sentences: max abs logit difference {diff:.3g}")
    if not diff <= args.atol:
        os.remove(args.out)
        raise UserError(f"the export differs from PyTorch by {diff:.3g} > --atol {args.atol:g}; removed it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
