"""What a run tells the user: the banner, a tqdm bar, training_history.json and Weights & Biases (rank 0).

Every method is a no-op on ranks other than 0, so callers never branch on the rank.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from mlm.common.cli import UserError
from mlm.common.files import HISTORY, append_json_list, read_history, write_json_list
from mlm.config import TrainConfig
from mlm.report.card import coverage
from mlm.report.probe import describe as describe_probe
from mlm.report.probe import scalars

log = logging.getLogger("mlm")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def use_wandb(report_to: str) -> bool:
    """wandb: required (error if it cannot work); all: used when installed and set up; none: never."""
    if report_to == "none":
        return False
    if importlib.util.find_spec("wandb") is None:  # asked before any work: no import of wandb yet
        if report_to == "wandb":
            raise UserError("--report_to wandb but wandb is not installed; pip install wandb, or --report_to none")
        return False
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or _wandb_has_key():
        return True
    if report_to == "wandb":
        raise UserError(
            "W&B has no API key: run `wandb login` or set WANDB_API_KEY (or WANDB_MODE=offline, or --report_to none)"
        )
    return False


def format_banner(rows: dict[str, Any]) -> str:
    width = max(map(len, rows))
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


# The W&B predictions table at each evaluation: (model, tokenizer) -> one row per sample sentence of
# (text, top tokens per mask, best joint fill, its score). Supplied by train_ddp.py from the inference package,
# which training modules do not import.
SampleRows = Callable[[Any, Any], list[list[Any]]]


class Tracker:
    def __init__(
        self,
        cfg: TrainConfig,
        run_config: dict,
        *,
        is_main: bool,
        start: tuple[int, Optional[str]],
        total_steps: int,
        sample_rows: Optional[SampleRows] = None,
    ):
        """start: the step the run starts from and the W&B run id it continues (both from the checkpoint)."""
        initial_step, run_id = start
        self.enabled = is_main
        self.sample_rows = sample_rows
        self.path = os.path.join(cfg.output_dir, HISTORY)
        history = (read_history(cfg.output_dir) or []) if is_main else []
        # Resume: entries after the resumed step are dropped, so no step is recorded twice.
        self.history = [h for h in history if h.get("step", 0) <= initial_step]
        self.history_written = False  # the file holds self.history (written whole once, then appended to)
        # The W&B run being continued already holds the steps the previous attempt logged after its last
        # checkpoint; they are not sent again (an exact resume recomputes the same values).
        self.wandb_floor = max((h.get("step", 0) for h in history), default=-1) if run_id else -1
        self.wandb = None
        self.run_id = run_id
        self.interactive = sys.stderr.isatty()
        self.bar = None
        if not self.enabled:
            return
        if use_wandb(cfg.report_to):
            self._init_wandb(cfg, run_config)
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self.total_steps = total_steps
        self.t0, self.step0 = time.perf_counter(), initial_step

    def _init_wandb(self, cfg: TrainConfig, run_config: dict) -> None:
        import wandb

        # Explicit options win, then the usual WANDB_* variables (wandb reads them itself when given None).
        tags = cfg.wandb_tags.split(",") if cfg.wandb_tags else None
        self.wandb = wandb.init(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "mlm-ddp",
            entity=cfg.wandb_entity,
            tags=[t.strip() for t in tags if t.strip()] if tags else None,
            name=cfg.wandb_run_name
            or os.environ.get("WANDB_NAME")
            or os.path.basename(os.path.normpath(cfg.output_dir)),
            dir=cfg.output_dir,
            config=run_config,
            id=self.run_id,
            resume="allow",
        )
        self.run_id = self.wandb.id

    def log_predictions(self, step: int, model, tokenizer) -> None:
        """A W&B Table of fill-mask predictions on fixed sentences at this evaluation: the curve and what the
        model predicts side by side. Rank 0, the unwrapped model, no collectives; training mode is restored."""
        if not (self.enabled and self.wandb and self.sample_rows) or step <= self.wandb_floor:
            return
        import wandb

        was_training = model.training
        try:
            rows = self.sample_rows(model, tokenizer)
        finally:
            model.train(was_training)
        table = wandb.Table(columns=["step", "text", "top tokens per mask", "best joint fill", "fill score"])
        for row in rows:
            table.add_data(step, *row)
        self.wandb.log({"eval/predictions": table}, step=step)

    def log_model(self, best_dir: str) -> None:
        """--wandb_log_model: best/ as a model artifact of this run."""
        if not (self.enabled and self.wandb and os.path.isdir(best_dir)):
            return
        import wandb

        artifact = wandb.Artifact(
            f"model-{self.wandb.id}", type="model", metadata={"source": os.path.abspath(best_dir)}
        )
        artifact.add_dir(best_dir)
        self.wandb.log_artifact(artifact, aliases=["best", "latest"])

    def _record(self, entry: dict) -> None:
        if self.history_written:
            append_json_list(self.path, entry)
        else:  # the first record of this attempt: the kept entries (a resume drops later ones) and this one
            write_json_list(self.path, self.history + [entry])
            self.history_written = True
        self.history.append(entry)

    def log_train(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"step": step, "epoch": round(epoch, 4), **metrics})
        if self.wandb and step > self.wandb_floor:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                mem=f"{metrics['peak_memory_gib']:.1f}G",
                mfu=f"{metrics['mfu']:.0%}",
                refresh=False,
            )
        else:
            eta = (time.perf_counter() - self.t0) / max(step - self.step0, 1) * (self.total_steps - step)
            print(
                f"step {step}/{self.total_steps} epoch {epoch:.2f} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.3e} grad_norm {metrics['grad_norm']:.3f} "
                f"tokens/s {metrics['tokens_per_s']:.0f} mfu {metrics['mfu']:.1%} "
                f"mem {metrics['peak_memory_gib']:.2f} GiB eta {eta / 60:.1f} min",
                flush=True,
            )

    def log_eval(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._record({"step": step, "epoch": round(epoch, 4), "eval": metrics})
        probe = metrics.get("probe") or {}
        if self.wandb and step > self.wandb_floor:
            values = {f"eval/{k}": v for k, v in metrics.items() if not isinstance(v, dict)}  # not the probes
            self.wandb.log({**values, **{f"probe/{k}": v for k, v in scalars(probe).items()}}, step=step)
        self.write(
            f"eval at step {step}: loss {metrics['loss']:.4f} perplexity {metrics['perplexity']:.3f} "
            f"accuracy {metrics['accuracy']:.4f} ({metrics['masked_tokens']} masked tokens"
            f"{'; ' + coverage(metrics) if coverage(metrics) else ''})"
            + (
                f"; SWA average of {metrics['swa_snapshots']}: perplexity {metrics['swa_perplexity']:.3f}"
                if "swa_perplexity" in metrics
                else ""
            )
            + (f"; probe {describe_probe(probe)}" if probe else "")
        )

    def log_test(self, step: int, metrics: dict[str, Any]) -> None:
        """best/ on the test split, once at the end: test/* at the final step and in the run's summary."""
        if not (self.enabled and self.wandb):
            return
        values = {f"test/{k}": v for k, v in metrics.items()}
        if step > self.wandb_floor:
            self.wandb.log(values, step=step)
        self.summary(values)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb:
            for k, v in values.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.wandb.summary[k] = v

    def advance(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb:
            self.wandb.finish()
