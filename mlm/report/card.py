"""best/README.md: the Hugging Face model card of the exported model, so that best/ is ready to upload as it is
(`hf upload USER/NAME outputs/RUN/best .`).

The YAML header is written by huggingface_hub's own ModelCardData (base model, datasets, pipeline tag and the
model-index results the Hub shows); the body says what the figures mean and how the model was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mlm.report.probe import FIGURE_NAMES

CARD_FILE = "README.md"
EXAMPLE_ROWS = 3  # sample sentences shown in the card (the W&B table has them all)


@dataclass(frozen=True, kw_only=True)
class CardFacts:
    """What the card says, gathered from the run by the caller (mlm.train.card_facts)."""

    model_name: str  # the run's name (its output_dir)
    base_model: Optional[str]  # a Hub id, for the header; None for a local directory or from scratch
    base_label: str  # how the body names the starting point
    dataset: Optional[tuple[str, Optional[str]]]  # (Hub name, configuration) of a Hub dataset, else None
    data_label: str  # how the body names the data
    masking: str  # "15% of tokens selected, 80/10/10 [MASK]/random/kept"
    validation: dict[str, Any]  # the evaluation that made best/ the best: loss, perplexity, accuracy, ...
    test: Optional[dict[str, Any]] = None  # best/ on the test split, once evaluated
    best_step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    global_batch: str = ""  # "64 = 32 per device x 2 processes x 1 accumulation"
    hardware: str = ""
    precision: str = ""
    train_seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    examples: list[list[Any]] = field(default_factory=list)  # rows of (text, top tokens per mask, fill, score)
    # The downstream probe: {"origin", "task", "folds", "base": figures of the model as loaded, "best": of best/,
    # "compared": mlm.report.probe.compare's sentence; without the base, why there is none (or "")}
    probe: Optional[dict[str, Any]] = None
    selected_by: str = "perplexity"  # what picked best/
    fresh_head: str = ""  # "the checkpoint lacks 6 tensor(s) ...": a head initialised afresh, else ""


def _probe_section(f: CardFacts) -> list[str]:
    """Did it help the task: the probe's figures on the model as loaded and on best/, side by side."""
    if not f.probe:
        return []
    base, best = f.probe.get("base"), f.probe["best"]
    names = [k for k in best if k in FIGURE_NAMES]
    rows = [
        "## Your task: the downstream probe",
        "",
        f"A {f.probe['folds']}-fold cross-validated linear probe ({f.probe['task']}) on the encoder's mean-pooled "
        f"features of {f.probe['origin']}; best/ was chosen by {f.selected_by}.",
        "",
        "| model | " + " | ".join(FIGURE_NAMES[k] for k in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    if base:
        rows.append("| base model, as loaded | " + " | ".join(f"{base[k]:.4f}" for k in names) + " |")
    rows.append(f"| this model (step {f.best_step}) | " + " | ".join(f"{best[k]:.4f}" for k in names) + " |")
    said = f.probe.get("compared")
    if said:  # the comparison, or why there is none
        rows += ["", f"Against the model as loaded: {said}." if base else f"{said[0].upper()}{said[1:]}."]
    return rows + [""]


def duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _eval_results(f: CardFacts) -> list:
    from huggingface_hub import EvalResult

    name, config = f.dataset if f.dataset else (f.data_label, None)
    results = []
    for split, metrics in (("validation", f.validation), ("test", f.test)):
        if not metrics:
            continue
        for metric in ("perplexity", "accuracy"):
            results.append(
                EvalResult(
                    task_type="fill-mask",
                    task_name="Masked language modeling",
                    dataset_type=name if f.dataset else "text",
                    dataset_name=name,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(float(metrics[metric]), 6),
                    metric_name=f"{split.capitalize()} {metric}",
                )
            )
    return results


def header(f: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=f.base_model,
        datasets=[f.dataset[0]] if f.dataset else None,
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["fill-mask", "masked-lm", "mlm-ddp"],
        model_name=f.model_name,
        eval_results=_eval_results(f),
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _results_table(f: CardFacts) -> list[str]:
    rows = ["| split | perplexity | accuracy | loss | masked tokens |", "| --- | --- | --- | --- | --- |"]
    for split, m in (("validation", f.validation), ("test", f.test)):
        if m:
            rows.append(
                f"| {split} | {m['perplexity']:.4f} | {m['accuracy']:.4f} | {m['loss']:.4f} | "
                f"{int(m['masked_tokens'])} |"
            )
    return rows


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def coverage(metrics: dict[str, Any]) -> str:
    """How much of its split an evaluation counted, in words; '' when it counted all of it."""
    n, of = metrics.get("examples"), metrics.get("split_examples")
    return f"the first {n} of the split's {of} examples (--max_eval_samples)" if n is not None and of and n < of else ""


def _counted(metrics: dict[str, Any]) -> str:
    return f"{coverage(metrics)}, each counted once" if coverage(metrics) else "every example of the split counted once"


def _exactness(f: CardFacts) -> str:
    """What the figures count: the whole split, or (with --max_eval_samples) how much of it."""
    splits = [("validation", f.validation)] + ([("test", f.test)] if f.test else [])
    counted = {_counted(m) for _, m in splits}
    where = next(iter(counted)) if len(counted) == 1 else "; ".join(f"{s}: {_counted(m)}" for s, m in splits)
    return (
        f"Each figure is exact ({where}), with masks fixed by the seed (the same on any number of GPUs), "
        "perplexity = exp(total NLL / total masked tokens)." + ("" if f.test else " No test split was evaluated.")
    )


def body(f: CardFacts) -> str:
    lines = [
        f"# {f.model_name}",
        "",
        f"{f.base_label} fine-tuned with masked language modeling ({f.masking}) on {f.data_label}, with "
        "mlm-ddp on PyTorch DDP.",
        "",
        *(
            [
                f"Its masked-LM head was not trained before this run: {f.fresh_head}. Before this fine-tuning its "
                "fill-mask predictions were noise and its perplexity near the vocabulary size; the figures below "
                "are the adapted model's.",
                "",
            ]
            if f.fresh_head
            else []
        ),
        "## Results",
        "",
        *_results_table(f),
        "",
        _exactness(f),
        "",
        *_probe_section(f),
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'fill = pipeline("fill-mask", model="path/to/this/folder")  # or its Hub id once uploaded',
        f'fill("{f.examples[0][0] if f.examples else "The capital of France is [MASK]."}")',
        "```",
        "",
    ]
    if f.examples:
        lines += [
            "What this model predicts (top tokens at each mask; for several masks, the best joint fill):",
            "",
            "| text | top tokens per mask | best joint fill |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(text)} | {_cell(per_mask)} | {_cell(fill)} |"
            for text, per_mask, fill, _ in f.examples[:EXAMPLE_ROWS]
        ]
        lines.append("")
    lines += [
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {_cell(f.base_label)} |",
        f"| data | {_cell(f.data_label)} |",
        f"| steps | best at step {f.best_step} of {f.total_steps} (epoch {f.epoch:.2f}) |",
        f"| global batch | {f.global_batch} |",
        f"| hardware | {_cell(f.hardware)} |",
        f"| precision | {f.precision} |",
        f"| wall time | {duration(f.train_seconds)} of training |",
    ]
    lines += [f"| {name} | {_cell(value)} |" for name, value in f.options.items()]
    lines += [
        "",
        "## Upload",
        "",
        "```bash",
        "hf auth login",
        "hf upload YOUR_NAME/MODEL_NAME path/to/this/folder .",
        "```",
        "",
    ]
    return "\n".join(lines)


def model_card(f: CardFacts) -> str:
    return header(f) + "\n" + body(f)
