"""Export a fill-mask model to ONNX, checked against PyTorch with onnxruntime.

    python -m mlm.inference.export_onnx MODEL_DIR OUT.onnx [--opset 17] [--atol 1e-4]
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
from typing import Any

import torch
from torch import nn

from mlm.common.cli import Parser, UserError, command_line
from mlm.inference.fill_mask import SAMPLE_SENTENCES
from mlm.inference.loading import load_model, resolve_model_path
from mlm.inference.onnx import LogitsOnly, OnnxMaskedLM, require_extras


def export(model: nn.Module, path: str, opset: int = 17) -> None:
    """Write the ONNX graph atomically (a temporary file renamed into place). A copy is traced: the exporter
    leaves the model it traces changed (measured: logits off by ~2.5 on longer inputs afterwards), and the
    check below needs the untouched model."""
    model = copy.deepcopy(model).eval().to("cpu")
    example = torch.tensor([[101, 2023, 103, 1012, 102]]) % model.config.vocab_size
    tmp = f"{path}.tmp"
    try:
        with torch.no_grad():
            torch.onnx.export(
                LogitsOnly(model),
                (example, torch.ones_like(example)),
                tmp,
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "logits")},
            )
    except Exception as e:  # the exporter's own limits for this architecture: say so in one line
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"the ONNX exporter cannot export {type(model).__name__} at opset {opset} ({reason}); "
            "use the PyTorch model (predict.py without --onnx), or try another --opset"
        ) from None
    os.replace(tmp, path)


def check(model: nn.Module, tokenizer, path: str, config: Any) -> float:
    """Largest absolute logit difference between PyTorch and onnxruntime on the sample sentences, padded to
    one batch (so the check also covers padding and other shapes than the export's)."""
    texts = [s.replace("[MASK]", tokenizer.mask_token) for s in SAMPLE_SENTENCES]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = LogitsOnly(model.eval())(enc["input_ids"], enc["attention_mask"])
    got = OnnxMaskedLM(path, config)(enc["input_ids"], enc["attention_mask"]).logits
    keep = enc["attention_mask"].bool()  # logits at padding positions are never read
    return float((ref[keep] - got[keep]).abs().max())


@command_line
def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m mlm.inference.export_onnx",
        description="Export a fill-mask model to ONNX and check it against PyTorch with onnxruntime.",
    )
    p.add_argument("model_dir", help="Run directory (its best/), saved model directory or Hub id.")
    p.add_argument("out", help="The .onnx file to write.")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17).")
    p.add_argument("--atol", type=float, default=1e-4, help="Largest logit difference accepted (default 1e-4).")
    args = p.parse_args(argv)
    require_extras()
    if not args.out.endswith(".onnx"):
        raise UserError(f"{args.out!r}: name the output file *.onnx")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UserError(f"{args.out!r}: the directory {parent!r} does not exist")
    model, tokenizer, _ = load_model(resolve_model_path(args.model_dir, "model_dir"), torch.device("cpu"), "model_dir")
    export(model, args.out, args.opset)
    diff = check(model, tokenizer, args.out, model.config)
    print(
        f"exported {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, opset {args.opset}); "
        f"onnxruntime vs PyTorch on {len(SAMPLE_SENTENCES)} sentences: max abs logit difference {diff:.3g}"
    )
    if not diff <= args.atol:
        os.remove(args.out)
        raise UserError(f"the export differs from PyTorch by {diff:.3g} > --atol {args.atol:g}; removed it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
