"""What a run tells the user: the banner, a tqdm bar, training_history.json and Weights & Biases (rank 0).

Every method is a no-op on ranks other than 0, so callers never branch on the rank.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import sys
import time
from typing import Any, Optional

from .checkpoint import write_json_atomic
from .config import TrainConfig, UserError

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
    try:
        import wandb  # noqa: F401
    except ImportError:
        if report_to == "wandb":
            raise UserError("--report_to wandb but wandb is not installed; pip install wandb, or --report_to none")
        return False
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or _wandb_has_key():
        return True
    if report_to == "wandb":
        raise UserError("W&B has no API key: run `wandb login` or set WANDB_API_KEY (or WANDB_MODE=offline, "
                        "or --report_to none)")
    return False


def format_banner(rows: dict[str, Any]) -> str:
    width = max(map(len, rows))
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


class Tracker:
    def __init__(self, cfg: TrainConfig, is_main: bool, total_steps: int, initial_step: int,
                 history: list[dict], run_config: dict, run_id: Optional[str]):
        self.enabled = is_main
        self.path = os.path.join(cfg.output_dir, "training_history.json")
        # Resume: entries after the resumed step are dropped, so no step is recorded twice.
        self.history = [h for h in history if h.get("step", 0) <= initial_step]
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
        self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", cfg.wandb_project),
                                name=cfg.wandb_run_name or os.path.basename(os.path.normpath(cfg.output_dir)),
                                dir=cfg.output_dir, config=run_config, id=self.run_id, resume="allow")
        self.run_id = self.wandb.id

    def _record(self, entry: dict) -> None:
        self.history.append(entry)
        write_json_atomic(self.path, self.history)

    def log_train(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"step": step, "epoch": round(epoch, 4), **metrics})
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        else:
            eta = (time.perf_counter() - self.t0) / max(step - self.step0, 1) * (self.total_steps - step)
            print(f"step {step}/{self.total_steps} epoch {epoch:.2f} loss {metrics['loss']:.4f} "
                  f"lr {metrics['lr']:.3e} grad_norm {metrics['grad_norm']:.3f} "
                  f"tokens/s {metrics['tokens_per_s']:.0f} eta {eta / 60:.1f} min", flush=True)

    def log_eval(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._record({"step": step, "epoch": round(epoch, 4), "eval": metrics})
        if self.wandb:
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self.write(f"eval at step {step}: loss {metrics['loss']:.4f} perplexity {metrics['perplexity']:.3f} "
                   f"accuracy {metrics['accuracy']:.4f} ({metrics['masked_tokens']} masked tokens)")

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb:
            for k, v in values.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.wandb.summary[k] = v

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

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
