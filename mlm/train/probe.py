"""The downstream probe at an evaluation: the encoder's features for every probe row, computed across the ranks
(each row once, as the exact evaluation counts each example once), then the cross-validated fit on rank 0
(mlm/report/probe.py).

The rows are tokenised once, sorted by length and cut into fixed batches; rank r takes batches r, r + W, ...
A row is always computed in the same batch, whatever the world size, so its features, and the figures, are the
same on 1 and on 2 ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from mlm.common.distributed import DistEnv, gather_to_main
from mlm.config import TrainConfig
from mlm.data.probe import ProbeSet, load_probe
from mlm.report.probe import FIGURE_NAMES, SELECTION, fit_probe, require_sklearn
from mlm.train.engine import autocast


@dataclass(frozen=True)
class Probe:
    rows: ProbeSet
    batches: list[dict[str, torch.Tensor]]  # input_ids and attention_mask, padded per batch
    order: np.ndarray  # batches' rows in sequence: order[i] is the file row of the i-th row of the batches
    folds: int
    seed: int

    @property
    def tokens(self) -> int:
        """Token positions one probing computes (padding included): what it costs beside an evaluation."""
        return sum(int(b["input_ids"].numel()) for b in self.batches)


def build_probe(cfg: TrainConfig, tokenizer) -> Optional[Probe]:
    """The probe of --probe_file, tokenised to --max_seq_length; None without one."""
    if not cfg.probe_file:
        return None
    require_sklearn()
    rows = load_probe(cfg)
    encoded = tokenizer(rows.texts, truncation=True, max_length=cfg.max_seq_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")  # less padding, the same on every rank
    size = cfg.per_device_eval_batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = [{"input_ids": encoded[i]} for i in order[start : start + size]]
        padded = tokenizer.pad(chunk, return_tensors="pt", return_attention_mask=True)
        batches.append({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})
    return Probe(rows, batches, order, cfg.probe_folds, cfg.seed)


@torch.no_grad()
def probe_features(model: nn.Module, probe: Probe, env: DistEnv, precision: str) -> Optional[np.ndarray]:
    """Mean-pooled last hidden states [rows, hidden] in file order, on rank 0 (None elsewhere). The backbone
    runs without the vocabulary head."""
    encoder = model.base_model
    was_training = model.training
    model.eval()
    mine = []
    for b in range(env.rank, len(probe.batches), env.world_size):
        ids = probe.batches[b]["input_ids"].to(env.device)
        mask = probe.batches[b]["attention_mask"].to(env.device)
        with autocast(precision, env.device):
            hidden = encoder(input_ids=ids, attention_mask=mask)[0]
        weights = mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)
        mine.append((b, pooled.cpu().numpy()))
    model.train(was_training)
    gathered = gather_to_main(mine, env)
    if gathered is None:
        return None
    by_batch = dict(item for part in gathered for item in part)
    stacked = np.concatenate([by_batch[b] for b in range(len(probe.batches))])
    features = np.empty_like(stacked)
    features[probe.order] = stacked
    return features


def probe_figures(model: nn.Module, probe: Probe, env: DistEnv, precision: str) -> Optional[dict[str, float]]:
    """The probe's figures on rank 0 (None elsewhere); every rank must call it (the features are gathered)."""
    features = probe_features(model, probe, env, precision)
    if features is None:
        return None
    targets = np.asarray(probe.rows.targets)
    return fit_probe(features, targets, probe.rows.task, probe.folds, probe.seed)


def rows_identity(probe: Probe) -> str:
    """The rows and folds the figures were measured on: two figures compare only under the same."""
    return f"{probe.rows.identity()}, {probe.folds} folds"


def keep_base(extra: dict[str, Any], probe: Probe, figures: dict[str, Any]) -> None:
    """The model as loaded's figures, kept in the checkpoints' state with the rows they were measured on."""
    if "probe_base" not in extra:
        extra["probe_base"], extra["probe_base_rows"] = figures, rows_identity(probe)


def base_figures(extra: dict[str, Any], probe: Probe) -> tuple[Optional[dict[str, Any]], str]:
    """(the model as loaded's figures, or None; why there are none, or ""). A resume may probe other rows than
    the run's start did (--probe_file, --probe_folds): its base figures then compare with nothing."""
    base, rows = extra.get("probe_base"), extra.get("probe_base_rows")
    if base is None:
        return None, ""
    if rows is not None and rows != rows_identity(probe):
        return None, (
            f"the model as loaded was probed on {rows}, this run probes {rows_identity(probe)} (the probe changed "
            "when the run resumed), so best/ is not compared with it"
        )
    return base, ""


def cost(probe: Probe, eval_examples: Optional[int], max_seq_length: int) -> str:
    """ "200,660 tokens, 83% of an evaluation's": the probe's forward work beside the evaluation's (its examples
    are max_seq_length long), said before the first step, since it is paid at every evaluation."""
    text = f"{probe.tokens:,} tokens"
    if eval_examples:
        text += f", {probe.tokens / (eval_examples * max_seq_length):.0%} of an evaluation's"
    return text


def selection_name(cfg: TrainConfig, probe: Optional[Probe]) -> str:
    """The figure that picks best/: "perplexity", or the probe's "probe macro-F1" / "probe RMSE"."""
    if cfg.metric_for_best_model != "probe" or probe is None:
        return "perplexity"
    return "probe " + FIGURE_NAMES[SELECTION[probe.rows.task][0]]
