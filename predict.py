"""Fill-mask predictions from a trained model.

    python predict.py                                       # newest best/ under outputs/, built-in sentences
    python predict.py "The capital of France is [MASK]." --top_k 10
    python predict.py --file sentences.txt --json > predictions.jsonl
    cat sentences.txt | python predict.py -
    python predict.py --model outputs/my-run --compare bert-base-uncased
    python predict.py --interactive

The prediction core (and the joint-fill algorithm) is mlm/inference/fill_mask.py; this file reads inputs and
prints.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional, TextIO

from mlm.common.cli import Parser, UserError, quiet_logging, report

# mlm.inference (and with it torch and transformers) is imported inside the functions that need it, so that a
# mistake on the command line is reported at once, before seconds of imports.

LEGEND = (
    "per mask: the top tokens and their probabilities there; joint fills (several masks): whole sentences, "
    "scored by the product of each token's probability when it was filled, most confident mask first"
)


def build_parser() -> Parser:
    p = Parser(
        prog="predict.py",
        description="Fill-mask predictions: the top-k tokens at each [MASK] and, for "
        "several masks, the top-k joint fills (most confident mask first, re-running the model, with a beam).",
    )
    p.add_argument(
        "texts",
        nargs="*",
        help="Texts with [MASK] (or <mask>, or the tokenizer's mask token); '-' "
        "reads texts from standard input, one per line. Default: built-in sample sentences.",
    )
    p.add_argument("--file", help="Read texts from FILE, one per line (blank lines skipped).")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="Prompt for texts until 'quit' or EOF (Ctrl-D); the model stays loaded.",
    )
    p.add_argument(
        "--model",
        help="Run directory (its best/ is used), saved model directory or Hub id. Default: "
        "the newest best/ under outputs/, where train_ddp.py writes.",
    )
    p.add_argument(
        "--onnx",
        help="Run this ONNX export of --model (python -m mlm.inference.export_onnx) with onnxruntime "
        "instead of PyTorch; the tokenizer and config come from --model.",
    )
    p.add_argument("--compare", help="A second model (e.g. the base model), shown beside the first for each input.")
    p.add_argument("--top_k", type=int, default=5, help="Tokens per mask, and joint fills per input (default: 5).")
    p.add_argument("--targets", help="Comma-separated words: score only these (as the HF fill-mask pipeline).")
    p.add_argument("--num_beams", type=int, default=None, help="Beam width of the joint fills (default: top_k).")
    p.add_argument("--json", action="store_true", help="One JSON object per input and line (JSON Lines).")
    p.add_argument("--batch_size", type=int, default=32, help="Inputs per forward pass (default: 32).")
    p.add_argument("--device", default="auto", help="auto (CUDA when available; the default), cpu or cuda[:N].")
    return p


def read_lines(stream: TextIO) -> list[str]:
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def gather_texts(args) -> list[str]:
    """Positional texts ('-' = stdin) and --file, in that order; the samples when none are given."""
    texts: list[str] = []
    for t in args.texts:
        if t == "-":
            got = read_lines(sys.stdin)
            if not got:
                raise UserError("standard input held no text; pipe one text with [MASK] per line")
            texts += got
        else:
            texts.append(t)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                got = read_lines(fh)
        except OSError as e:
            raise UserError(f"--file {args.file!r} cannot be read ({e.strerror}); give an existing text file") from None
        except UnicodeDecodeError:
            raise UserError(f"--file {args.file!r} is not UTF-8 text; give a text file, one text per line") from None
        if not got:
            raise UserError(f"--file {args.file!r} holds no text; give a file with one text with [MASK] per line")
        texts += got
    if not texts and not args.texts and not args.file and not args.interactive:
        from mlm.inference.fill_mask import SAMPLE_SENTENCES

        texts = list(SAMPLE_SENTENCES)
    return texts


def check_args(args) -> None:
    for name in ("top_k", "batch_size", "num_beams"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, got {v}")
    if args.interactive and "-" in args.texts:
        raise UserError("'-' and --interactive both read standard input; use one of them")
    if args.targets is not None and not [w for w in args.targets.split(",") if w.strip()]:
        raise UserError("--targets is empty; give comma-separated words, e.g. --targets paris,london")


def emit(preds, as_json: bool, out: TextIO) -> None:
    from mlm.inference.fill_mask import render

    for p in preds:
        if as_json:
            out.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
            continue
        out.write(f"\n> {p.text}\n")
        if p.compare is None:
            out.write("\n".join(render(p)) + "\n")
        else:
            for q in (p, p.compare):
                out.write(f"  [{q.model}]\n" + "\n".join(render(q, indent="    ")) + "\n")
    out.flush()


class Predictor:
    """The loaded model(s) and the options: texts in, predictions (with the comparison attached) out."""

    def __init__(self, args):
        from mlm.inference.fill_mask import FillMask
        from mlm.inference.loading import find_default_model

        if args.model is None:
            path, note = find_default_model()
            self.note = f"model: {path} ({note})"
        else:
            path, self.note = args.model, f"model: {args.model}"
        self.main = FillMask(path, device=args.device, onnx=args.onnx)
        if args.onnx:
            self.note += f", run by onnxruntime from {args.onnx}"
        self.other: Optional[FillMask] = None
        if args.compare:
            self.other = FillMask(args.compare, device=args.device, flag="--compare")
            self.note += f"; compared with {args.compare}"
        self.options = dict(
            top_k=args.top_k,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            targets=[w.strip() for w in args.targets.split(",") if w.strip()] if args.targets else None,
        )

    def __call__(self, texts: list[str]):
        preds = self.main.predict(texts, **self.options)
        if self.other is not None:
            for p, q in zip(preds, self.other.predict(texts, **self.options)):
                p.compare = q
        return preds


def interact(predictor: Predictor, as_json: bool) -> None:
    """A prompt loop: one text per line; a bad line is reported and the loop goes on."""
    prompt = "text with [MASK] ('quit' or Ctrl-D to end)> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt) if prompt else sys.stdin.readline()
        except EOFError:
            break
        if not line or line.strip().lower() in ("quit", "exit"):
            break  # readline() gives "" only at EOF
        if not line.strip():
            continue
        try:
            emit(predictor([line.rstrip("\r\n")]), as_json, sys.stdout)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        texts = gather_texts(args)
        quiet_logging(logging.WARNING)  # our own warning says when a head is fresh
        predictor = Predictor(args)
        preds = predictor(texts) if texts else []  # every input is checked before anything is printed
        if args.json:
            print(predictor.note, file=sys.stderr, flush=True)
        else:
            print(f"{predictor.note}\n{LEGEND}", flush=True)
        emit(preds, args.json, sys.stdout)
        if args.interactive:
            interact(predictor, args.json)
        return 0
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
