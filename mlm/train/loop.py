"""The control loop: train steps, and when to log, evaluate, export best/, save and stop.

Rank 0 owns the decisions (best model, early stopping); each is broadcast so every rank leaves the loop at
the same step (invariant 6, docs/DESIGN.md). Host-device syncs happen only at logging, evaluation and checkpoint
steps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch

from mlm.common.cli import UserError
from mlm.common.distributed import DistEnv, broadcast_flag, dist_max, gather_to_main
from mlm.config import TrainConfig
from mlm.data.cached import DataBundle
from mlm.model.modeling import LoadReport
from mlm.report.card import CARD_FILE, model_card
from mlm.report.metrics import Throughput
from mlm.report.probe import describe as describe_probe
from mlm.report.probe import scalars, selection_value
from mlm.report.tracking import Tracker
from mlm.train.card_facts import card_facts
from mlm.train.checkpoint import (
    RankRngs,
    TrainState,
    checkpoint_bytes,
    checkpoint_dirs,
    rng_state,
    save_checkpoint,
)
from mlm.train.engine import (
    EVAL_METRICS,
    Masking,
    Trainable,
    evaluate,
    prepare_batch,
    train_step,
)
from mlm.train.export import export_pretrained
from mlm.train.meter import StepMeter
from mlm.train.plan import RunPlan
from mlm.train.preemption import OUT_OF_TIME, OutOfTime, Preempted, StopRequest, signal_name
from mlm.train.probe import Probe, keep_base, probe_figures, selection_name
from mlm.train.runlock import RunLock
from mlm.train.swa import WeightAverage
from mlm.train.writes import write_on_main

T = TypeVar("T")


class NonFiniteLoss(Exception):
    """Raised on every rank at the same step when the loss stayed non-finite for max_nonfinite_steps steps."""


@dataclass(frozen=True)
class Length:
    """How long the run is: optimizer steps in all, and micro-batches per epoch (None for a stream)."""

    total_steps: int
    micro_per_epoch: Optional[int]

    def steps_per_epoch(self, accumulation: int) -> Optional[int]:
        return None if self.micro_per_epoch is None else math.ceil(self.micro_per_epoch / accumulation)


@dataclass(kw_only=True)
class Run:
    """Everything fit() wires together, built by train_ddp.py from a few parts, by keyword."""

    cfg: TrainConfig  # what the user asked for, never changed
    plan: RunPlan  # what the run trains with: batch layout and step budget (a resume may derive them)
    env: DistEnv
    trainable: Trainable  # what a step runs and changes (trainable.loss.model is the Hugging Face model)
    masking: Masking
    data: DataBundle
    tokenizer: Any  # saved with best/
    state: TrainState
    length: Length
    throughput: Throughput
    tracker: Tracker
    stop_request: StopRequest
    swa: Optional[WeightAverage] = None
    probe: Optional[Probe] = None  # --probe_file's rows, probed at every evaluation
    loaded: Optional[LoadReport] = None  # what loading the model initialised afresh or resized
    lock: Optional[RunLock] = None  # rank 0's hold on output_dir (mlm/train/runlock.py); None elsewhere


def run_length(cfg: TrainConfig, plan: RunPlan, micro_per_epoch: Optional[int]) -> Length:
    """Total optimizer steps: the plan's step budget, or the epochs' worth (a stream's epoch length is unknown)."""
    if micro_per_epoch is None:
        return Length(plan.max_train_steps, None)
    per_epoch = Length(0, micro_per_epoch).steps_per_epoch(plan.layout.accumulation)
    return Length(plan.max_train_steps or math.ceil(cfg.num_train_epochs * per_epoch), micro_per_epoch)


def _epoch_float(run: Run) -> float:
    if run.length.micro_per_epoch is None:  # a stream: the fraction of an epoch is unknown
        return float(run.state.epoch)
    return run.state.epoch + run.data.train.fraction(run.state.epoch_offset, run.state.micro_in_epoch)


def evaluate_and_decide(run: Run) -> bool:
    """Evaluate (and probe); on rank 0 keep the best model by --metric_for_best_model, export best/, count
    patience. Returns the agreed stop flag."""
    cfg, state = run.cfg, run.state
    precision = run.trainable.precision
    t0 = time.perf_counter()
    metrics = evaluate(run.trainable.loss, run.data.eval_loader, run.env, run.masking, precision)
    eval_seconds = time.perf_counter() - t0
    swa = run.swa if run.swa is not None and run.swa.count else None
    if swa is not None:  # the averaged weights, evaluated the same exact way
        swa_metrics = evaluate(swa.loss_module, run.data.eval_loader, run.env, run.masking, precision)
        metrics.update({f"swa_{k}": v for k, v in swa_metrics.items()}, swa_snapshots=swa.count)
    if run.probe is not None:
        t0 = time.perf_counter()
        figures = probe_figures(run.trainable.loss.model, run.probe, run.env, precision)
        if figures is not None:  # rank 0
            # What the probe costs beside the evaluation, in the history: seconds of each.
            seconds = {"seconds": round(time.perf_counter() - t0, 3), "evaluation_seconds": round(eval_seconds, 3)}
            metrics["probe"] = {**figures, **seconds}
            if state.step == 0:  # the model as loaded: what the card and the log compare against
                keep_base(state.extra, run.probe, figures)
        if swa is not None and _swa_leads(run, metrics):  # best/ would hold the average: probe the average itself
            swa_figures = probe_figures(swa.model, run.probe, run.env, precision)
            if swa_figures is not None:
                metrics["swa_probe"] = swa_figures
    stop = write_on_main(
        run.env, cfg.output_dir, state.step, "the evaluation, best/ and the history", lambda: _decide(run, metrics, swa)
    )
    stop = broadcast_flag(bool(stop), run.env.device)
    if stop:
        state.stopped_early = True
        run.tracker.write(
            f"early stopping at step {state.step}: no improvement in "
            f"{cfg.early_stopping_patience} evaluations (best {best_name(run)} {state.best_metric})"
        )
    return stop


def best_name(run: Run) -> str:
    return selection_name(run.cfg, run.probe)


def _best_value(run: Run, metrics: dict[str, Any], use_swa: bool) -> tuple[float, bool]:
    """(the value that picks best/, whether higher is better)."""
    if run.cfg.metric_for_best_model == "probe" and run.probe is not None:
        return selection_value(metrics["probe"], run.probe.rows.task)
    return (metrics["swa_perplexity"] if use_swa else metrics["perplexity"]), False


def _improved(value: float, best: Optional[float], higher: bool, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if higher else value < best - min_delta


def _swa_leads(run: Run, metrics: dict[str, Any]) -> bool:
    """Whether best/ would be the SWA average: it is chosen by perplexity only (under --metric_for_best_model
    probe, best/ is the live model), when its perplexity is the lower. Every rank decides the same (the
    evaluation's figures are reduced over all ranks)."""
    return (
        "swa_perplexity" in metrics
        and run.cfg.metric_for_best_model == "perplexity"
        and metrics["swa_perplexity"] < metrics["perplexity"]
    )


def _decide(run: Run, metrics: dict[str, Any], swa: Optional[WeightAverage]) -> bool:
    """Rank 0: log the evaluation, export best/ when it improved, count patience; whether to stop early."""
    cfg, state = run.cfg, run.state
    if run.lock is not None:
        run.lock.check()
    run.tracker.log_eval(state.step, _epoch_float(run), metrics)
    use_swa = swa is not None and _swa_leads(run, metrics)
    value, higher = _best_value(run, metrics, use_swa)
    improved = _improved(value, state.best_metric, higher, cfg.early_stopping_min_delta)
    model = run.trainable.loss.model
    run.tracker.log_predictions(state.step, model, run.tokenizer)
    if improved:
        best_model = swa.model if use_swa else model
        prefix = "swa_" if use_swa else ""
        best_metrics = {k: metrics[prefix + k] for k in EVAL_METRICS}
        if prefix + "probe" in metrics:
            best_metrics["probe"] = metrics[prefix + "probe"]
        facts = card_facts(run, best_metrics, best_step=state.step, epoch=_epoch_float(run))
        export_pretrained(
            best_model,
            run.tokenizer,
            os.path.join(cfg.output_dir, "best"),
            {"step": state.step, "epoch": _epoch_float(run), **metrics, "swa": use_swa},
            {CARD_FILE: model_card(facts)},
        )
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0  # once best/ is on disk
        shown = f"{value:.4f}" if best_name(run) != "perplexity" else f"{value:.3f}"
        run.tracker.write(
            f"new best {best_name(run)} {shown} at step {state.step}"
            f"{' (the SWA average)' if use_swa else ''}: exported best/"
        )
        run.tracker.summary(
            {
                "best/perplexity": metrics[f"{prefix}perplexity"],
                "best/loss": metrics[f"{prefix}loss"],
                "best/accuracy": metrics[f"{prefix}accuracy"],
                "best/step": state.step,
                "best/swa": use_swa,
                **{f"best/probe_{k}": v for k, v in scalars(best_metrics.get("probe", {})).items()},
            }
        )
    else:
        state.bad_evals += 1
    return cfg.early_stopping_patience > 0 and state.bad_evals >= cfg.early_stopping_patience


def probe_before_training(run: Run) -> None:
    """The probe on the model as loaded, when no evaluation before the first step gives it
    (--eval_on_start false): the base figures the card and the log compare against."""
    figures = probe_figures(run.trainable.loss.model, run.probe, run.env, run.trainable.precision)
    if figures is not None:
        keep_base(run.state.extra, run.probe, figures)
        run.tracker.write(f"probe on the model as loaded: {describe_probe(figures)}")


# The options a model card lists (besides batch, steps, hardware and precision, which it shows anyway).
def checkpoint_parts(trainable: Trainable, swa: Optional[WeightAverage], rngs: RankRngs) -> dict[str, Any]:
    """The pieces of a checkpoint besides the weights and TrainState, by file name (docs/DESIGN.md)."""
    return {
        "optimizer": trainable.optimizer,
        "scheduler": trainable.schedule,
        "scaler": trainable.scaler,
        "rng_states": rngs,
        "swa": swa,
    }


def save(run: Run) -> None:
    t0 = time.perf_counter()
    _save(run)
    run.stop_request.save_seconds = time.perf_counter() - t0


def _save(run: Run) -> None:
    rngs = RankRngs(run.env.rank, gather_to_main(rng_state(), run.env))
    data_states = gather_to_main(run.data.train.state_dict(), run.env)  # a stream's position, per rank

    def write() -> None:
        if run.lock is not None:
            run.lock.check()
        run.state.tracker_run_id = run.tracker.run_id
        run.state.extra["data_states"] = data_states
        # Readable before the model is built: a resume with another global batch sizes its run from it.
        run.state.extra["schedule"] = run.trainable.schedule.state_dict()
        parts = checkpoint_parts(run.trainable, run.swa, rngs)
        model = run.trainable.loss.model
        path = save_checkpoint(run.cfg.output_dir, run.state, model, parts, run.cfg.save_total_limit, run.tokenizer)
        run.tracker.write(f"saved checkpoint {path}")

    write_on_main(run.env, run.cfg.output_dir, run.state.step, "a checkpoint", write)


def nonfinite_message(run: Run, consecutive: int) -> str:
    saved = checkpoint_dirs(run.cfg.output_dir)
    return (
        f"training stopped at step {run.state.step}: the loss or the gradients were not finite for "
        f"{consecutive} consecutive steps (those steps were skipped, so the weights are unchanged since the "
        f"last good step); kept {saved[-1][1] if saved else 'no checkpoint yet'} and best/ as they were. "
        f"Lower --learning_rate or --max_grad_norm, check the data, or use --precision bf16/fp32"
    )


def same_step_on_all_ranks(step: int, env: DistEnv) -> bool:
    """Check that every rank left the loop at the same step (invariant 6)."""
    t = torch.tensor([step, -step], dtype=torch.float64, device=env.device)
    hi, neg_lo = dist_max(t).tolist()
    return hi == -neg_lo


def _log(run: Run, meter: StepMeter) -> None:
    """A logging step (the only host-device syncs of training besides evaluation and saving)."""
    metrics = meter.collect()
    consecutive = metrics.pop("consecutive_skipped")
    lr = max(run.trainable.schedule.get_last_lr())
    write_on_main(
        run.env,
        run.cfg.output_dir,
        run.state.step,
        "the training history",
        lambda: run.tracker.log_train(run.state.step, _epoch_float(run), {**metrics, "lr": lr}),
    )
    meter.reset()
    if run.cfg.max_nonfinite_steps and consecutive >= run.cfg.max_nonfinite_steps:
        raise NonFiniteLoss(nonfinite_message(run, consecutive))


def _stop_if_signalled(run: Run, last_saved: int) -> None:
    """Every step: all ranks agree whether any got SIGTERM/SIGINT, or whether the --max_runtime budget leaves
    time for no more than this checkpoint, and leave at the same boundary with a save."""
    signum = run.stop_request.agreed()
    if not signum:
        return
    if signum == OUT_OF_TIME:
        req = run.stop_request
        run.tracker.write(
            f"time budget (--max_runtime {run.cfg.max_runtime}) nearly spent: another step and "
            f"checkpoint would end at {req.projected_end:.1f} s of {req.budget:g} s (step "
            f"{req.step_seconds:.2f} s, checkpoint {req.save_seconds:.2f} s); saving a checkpoint at "
            f"step {run.state.step} on all ranks"
        )
    else:
        run.tracker.write(
            f"stop requested ({signal_name(signum)}): saving a checkpoint at step {run.state.step} on all ranks"
        )
    if last_saved != run.state.step:
        save(run)
    raise (
        OutOfTime(
            f"stopped at step {run.state.step}: the --max_runtime {run.cfg.max_runtime} budget leaves no "
            "time for another step and checkpoint"
        )
        if signum == OUT_OF_TIME
        else Preempted(signum)
    )


def _one_step(run: Run, group: list[dict], meter: StepMeter) -> bool:
    """Mask, step, count; returns whether the epoch ended with this step."""
    state, env = run.state, run.env
    micro = [prepare_batch(raw, state.epoch, run.masking, env.device) for raw in group]
    head_only = state.step < run.cfg.head_warmup_steps  # --head_warmup_steps: the encoder held still
    meter.add(train_step(run.trainable, micro, env, train_encoder=not head_only))
    state.step += 1
    state.micro_in_epoch += len(group)
    if run.swa is not None:
        run.swa.update(run.trainable.loss.model, state.step)
    epoch_end = run.length.micro_per_epoch is not None and state.micro_in_epoch >= run.data.train.micro_from(
        state.epoch_offset
    )
    if epoch_end:  # recorded before any save, so a checkpoint here resumes at the next epoch
        state.epoch, state.micro_in_epoch, state.epoch_offset = state.epoch + 1, 0, 0
    run.tracker.advance()
    return epoch_end


def fit(run: Run) -> TrainState:
    cfg, state = run.cfg, run.state
    total = run.length.total_steps
    meter = StepMeter(run.env.device, run.throughput)
    last_saved = state.step if state.step else -1
    stop = False
    # Until a save has been timed: a checkpoint written at 100 MB/s (the first save replaces the guess).
    run.stop_request.save_seconds = checkpoint_bytes(run.trainable.loss.model) / 100e6
    t_iteration = time.perf_counter()
    if cfg.eval_on_start and state.step == 0 and state.best_metric is None:
        stop = evaluate_and_decide(run)
    elif run.probe is not None and state.step == 0 and "probe_base" not in state.extra:
        probe_before_training(run)
    run.trainable.wrapped.train()
    while state.step < total and not stop:
        steps_before, fresh_epoch = state.step, state.micro_in_epoch == 0
        for group in run.data.train.groups(
            state.epoch, state.micro_in_epoch, run.plan.layout.accumulation, state.epoch_offset
        ):
            epoch_end = _one_step(run, group, meter)
            if state.step % cfg.logging_steps == 0 or state.step == total:
                _log(run, meter)
            # The budget check's "one more step": the last iteration, its evaluation and save included.
            now = time.perf_counter()
            run.stop_request.step_seconds = max(run.stop_request.step_seconds * 0.9, now - t_iteration)
            state.train_seconds += now - t_iteration
            t_iteration = now
            _stop_if_signalled(run, last_saved)
            t_pause = time.perf_counter()
            final = state.step >= total
            eval_due = (state.step % cfg.eval_steps == 0 if cfg.eval_steps else epoch_end) or final
            if eval_due:
                stop = evaluate_and_decide(run)
            if (state.step % cfg.save_steps == 0 if cfg.save_steps else eval_due) or stop:
                save(run)
                last_saved = state.step
            meter.exclude_since(t_pause)
            if stop or final or epoch_end:
                break
        else:  # a stream ran out on some rank: every rank starts the next epoch (a new shuffle) together
            if state.step == steps_before and fresh_epoch:  # (resumed at an epoch's very end: nothing left)
                raise UserError(
                    f"the training stream gave no full batch of {cfg.per_device_train_batch_size} "
                    f"examples of {cfg.max_seq_length} tokens on some rank in epoch {state.epoch}; "
                    "give more text, or a smaller --per_device_train_batch_size or --max_seq_length"
                )
            state.epoch, state.micro_in_epoch, state.epoch_offset = state.epoch + 1, 0, 0
    if last_saved != state.step:
        save(run)
    return state
