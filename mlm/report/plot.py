"""Curves without W&B: `python -m mlm.report.plot OUTPUT_DIR [--out DIR]` draws training_history.json into PNG files.

    loss.png           training loss per logged step, evaluation loss at each evaluation
    perplexity.png     evaluation perplexity (log scale), the best one marked
    learning_rate.png  the learning-rate schedule as it ran

matplotlib is an optional extra (`pip install -r requirements-extras.txt`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from mlm.common.cli import Parser, UserError, command_line
from mlm.common.files import HISTORY, eval_entries, read_history, train_entries


def load_history(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, HISTORY)
    if not os.path.isfile(path):
        raise UserError(f"{output_dir!r} has no {HISTORY}; pass the output_dir of a training run")
    history = read_history(output_dir)
    if history is None:
        raise UserError(f"{path!r} is not a readable JSON list; was it written by train_ddp.py?")
    if not history:
        raise UserError(f"{path!r} holds no logged steps yet; plot after the first logging_steps")
    return history


def series(history: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """(steps, values) per curve; non-finite values are dropped (a log scale cannot show them)."""

    def pick(rows, key):
        pts = [(h["step"], v) for h in rows if isinstance(v := key(h), (int, float)) and math.isfinite(v)]
        return [p[0] for p in pts], [p[1] for p in pts]

    train, evals = train_entries(history), eval_entries(history)
    return {
        "train_loss": pick(train, lambda h: h["loss"]),
        "lr": pick(train, lambda h: h.get("lr")),
        "eval_loss": pick(evals, lambda h: h.get("loss")),
        "eval_perplexity": pick(evals, lambda h: h.get("perplexity")),
    }


def visible(points: tuple[list[float], list[float]]) -> dict:
    """A line through one point draws nothing: a curve of one logged point (a short first run) gets a marker."""
    return {"marker": "o"} if len(points[0]) == 1 else {}


def plot(output_dir: str, out_dir: str | None = None) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed: pip install matplotlib (or pip install -e .[plot])") from None
    s = series(load_history(output_dir))
    out_dir = out_dir or output_dir
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*s["train_loss"], label="train loss", linewidth=1, **visible(s["train_loss"]))
    ax.plot(*s["eval_loss"], "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="masked-token loss (nats)", title=f"loss: {os.path.basename(output_dir)}")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, ppl = s["eval_perplexity"]
    ax.plot(steps, ppl, "o-", color="tab:green", label="eval perplexity")
    if ppl:
        best = min(range(len(ppl)), key=ppl.__getitem__)
        ax.plot(
            [steps[best]],
            [ppl[best]],
            "*",
            markersize=14,
            color="tab:red",
            label=f"best {ppl[best]:.3f} at step {steps[best]}",
        )
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="perplexity", title="evaluation perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "perplexity.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*s["lr"], color="tab:orange", **visible(s["lr"]))
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
    ax.grid(alpha=0.3)
    save(fig, "learning_rate.png")
    return written


@command_line
def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m mlm.report.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("output_dir", help="A training run's output_dir (it holds training_history.json).")
    p.add_argument("--out", default=None, help="Where to write the PNG files (default: output_dir).")
    args = p.parse_args(argv)
    for path in plot(args.output_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
