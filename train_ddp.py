"""Masked-LM fine-tuning on PyTorch DDP.

    torchrun --nproc_per_node=2 train_ddp.py [options]      # python train_ddp.py --help lists them

parse -> distributed setup -> build (tokenizer, data, model, optimizer) -> resume -> train -> teardown.
The parts and the invariants they keep: docs/DESIGN.md.
"""

from __future__ import annotations

import sys

from mlm.config import answer_user_errors_first

if __name__ == "__main__":
    # Bad options and paths are answered here, in a tenth of a second on every rank, before the imports below
    # (torch, then transformers) cost each rank seconds.
    answer_user_errors_first(sys.argv[1:])

import json
import logging
import os
import time
from dataclasses import replace
from typing import Optional

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from mlm.common.cli import (
    EXIT_DISK_FULL,
    EXIT_FAILURE,
    EXIT_NONFINITE,
    EXIT_USER_ERROR,
    UserError,
    quiet_logging,
    versions,
)
from mlm.common.distributed import (
    DistEnv,
    any_rank,
    broadcast_object,
    describe_failure,
    dist_sum,
    init_distributed,
    is_peer_failure,
    main_decides,
    main_only,
    main_process_first,
    teardown,
    wrap_ddp,
)
from mlm.common.files import DiskFull, free_bytes, is_disk_full, read_json, write_json_atomic
from mlm.common.workers import env_rank, report_user_error, restart_count, stopped_on_a_user_error
from mlm.config import TrainConfig, parse_command_line, runtime_seconds, token_list
from mlm.data import cached, streaming
from mlm.inference.fill_mask import sample_rows
from mlm.model import modeling
from mlm.model.heads import head_path, split_encoder_head
from mlm.model.modeling import fresh_head_text
from mlm.report import metrics, tracking
from mlm.train import checkpoint, engine, finish, loop, optim, probe, runlock, writes
from mlm.train.plan import BatchLayout, RunPlan
from mlm.train.preemption import OutOfTime, Preempted, StoppedPreparing, StopRequest
from mlm.train.swa import WeightAverage

log = logging.getLogger("mlm")


def choose_resume(cfg: TrainConfig, env: DistEnv) -> Optional[str]:
    """Rank 0 picks the checkpoint (after cleaning up torn saves); every rank must be able to read it."""
    # A restarted attempt continues its own run: overwriting would delete the checkpoints it resumes from.
    overwrite = cfg.overwrite_output_dir and restart_count() == 0
    resume = main_process_first(
        env,
        lambda: (
            checkpoint.choose_resume(cfg.output_dir, cfg.resume_from_checkpoint, overwrite)
            if env.is_main and cfg.do_train
            else None
        ),
    )
    resume = broadcast_object(resume, env)
    if resume and any_rank(not os.path.isdir(resume), env):
        raise UserError(
            f"checkpoint {resume!r} is not visible on every node; every rank reads it on resume, so "
            "with several nodes put --output_dir on a filesystem they all share"
        )
    return resume


def plan_run(cfg: TrainConfig, env: DistEnv, precision: str, resume: Optional[str], given: frozenset[str]) -> RunPlan:
    """The batch layout and step budget: the config's, or on a resume the checkpoint's global batch kept on this
    hardware (given: the options the user set, so an accumulation they chose is not derived)."""
    layout = BatchLayout(cfg.per_device_train_batch_size, env.world_size, cfg.gradient_accumulation_steps)
    as_asked = RunPlan(layout, cfg.max_train_steps)
    saved = checkpoint.saved_state(resume) if resume and checkpoint.is_complete(resume) else None
    if saved is None:
        return as_asked  # no resume, or load_checkpoint says what is wrong with the checkpoint
    if not saved.get("gradient_accumulation_steps"):  # written before checkpoints recorded it: the run config has it
        run_config = os.path.join(cfg.output_dir, "run_config.json")
        saved["gradient_accumulation_steps"] = (
            read_json(run_config).get("gradient_accumulation_steps", 1) if os.path.isfile(run_config) else 1
        )
    data_states = saved.get("extra", {}).get("data_states") or []
    if saved["world_size"] != env.world_size and any(data_states):
        raise UserError(
            f"the checkpoint was written by a --streaming run on {saved['world_size']} processes; a "
            f"stream cannot move to {env.world_size}: each rank's position is in its own shard of the "
            f"stream, and continuing on another split would train some texts twice. Resume on "
            f"{saved['world_size']} processes, or start afresh with --overwrite_output_dir"
        )
    chosen = cfg.gradient_accumulation_steps if "gradient_accumulation_steps" in given else None
    accumulation, notes = checkpoint.adapt_to_checkpoint(
        saved, env.world_size, cfg.per_device_train_batch_size, chosen, precision
    )
    layout = BatchLayout(cfg.per_device_train_batch_size, env.world_size, accumulation)
    left = checkpoint.steps_left(saved, layout.global_batch)
    max_steps = cfg.max_train_steps
    if layout.global_batch != checkpoint.global_batch(saved, 1) and left is not None:
        max_steps = saved["step"] + left  # the examples the schedule has left, at the new global batch
    return RunPlan(layout, max_steps, tuple(notes))


def peak_flops(env: DistEnv, precision: str) -> tuple[float, str]:
    """The summed peak of all ranks (MFU's denominator), measured or from the data sheet on every rank at once."""
    peak, source = metrics.device_peak(env.device, precision)
    return float(dist_sum(torch.tensor([peak], dtype=torch.float64, device=env.device)).item()), source


def banner(run: loop.Run, resume: Optional[str], peak_source: str) -> str:
    cfg, env, t, layout = run.cfg, run.env, run.trainable, run.plan.layout
    model, s = t.loss.model, run.data.stats
    total = run.length.total_steps
    return "mlm-ddp\n" + tracking.format_banner(
        {
            "model": f"{cfg.model_name_or_path or 'from scratch: ' + str(cfg.config_name or 'BertConfig')} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)",
            "attention / head": f"{modeling.attention_kernel(model)} "
            f"(--attn_implementation {cfg.attn_implementation}); vocabulary logits at {head_path(model)}",
            "world size / device": f"{env.world_size} x {env.device.type} "
            f"({'nccl' if env.device.type == 'cuda' else 'gloo'})",
            "precision": engine.describe_precision(t),
            "global batch": layout.describe(),
            "steps": f"{run.length.steps_per_epoch(layout.accumulation) or 'unknown (a stream)'} per "
            f"epoch, {total} total, {optim.warmup_steps(cfg, total)} warmup ({cfg.lr_scheduler_type})",
            "train": s["train"],
            "eval": s["eval"],
            **({"test": s["test"]} if "test" in s else {}),
            "data": s["data"],
            **({"messy text": s["messy text"]} if "messy text" in s else {}),
            "peak (for MFU)": f"{run.throughput.peak_flops / 1e12:.3g} TFLOP/s over {env.world_size} rank(s) "
            f"({peak_source})",
            **(
                {
                    "probe": f"{run.probe.rows.describe()}; {run.probe.folds}-fold linear probe at every "
                    f"evaluation ({probe.cost(run.probe, eval_examples(run), cfg.max_seq_length)}); best/ by "
                    f"{probe.selection_name(cfg, run.probe)}"
                }
                if run.probe is not None
                else {}
            ),
            "output": cfg.output_dir + (f" (resuming from {resume}, step {run.state.step})" if resume else ""),
            **({"changed since checkpoint": "; ".join(run.plan.changes)} if run.plan.changes else {}),
            **model_notes(run),
        }
    )


def eval_examples(run: loop.Run) -> Optional[int]:
    """The evaluation's examples, where its dataset has a length."""
    try:
        return len(run.data.eval_loader.dataset)
    except (AttributeError, TypeError):
        return None


def model_notes(run: loop.Run) -> dict[str, str]:
    """Banner rows for a head initialised afresh, tokens added and embeddings resized."""
    cfg, report, notes = run.cfg, run.loaded, {}
    if report is not None and report.fresh:
        notes["fresh head"] = (
            f"{fresh_head_text(report.fresh)}; the first perplexity is near the vocabulary size "
            f"({len(run.tokenizer)}) and fill-mask before training is noise"
            + (
                f"; the head trains alone for the first {cfg.head_warmup_steps} steps"
                if cfg.head_warmup_steps
                else "; --head_warmup_steps N trains it alone first"
            )
        )
    elif cfg.head_warmup_steps:
        notes["head warmup"] = f"the head trains alone for the first {cfg.head_warmup_steps} steps"
    if report is not None and report.resized:
        before, after = report.resized
        added = [*token_list("add_tokens", cfg.add_tokens), *token_list("add_special_tokens", cfg.add_special_tokens)]
        notes["tokens"] = (
            f"embeddings resized {before} -> {after}"
            + (
                f" for {len(added)} added token(s): {', '.join(added[:8])}{' ...' if len(added) > 8 else ''}"
                if added
                else " (the tokenizer is larger than the model)"
            )
            + "; new rows initialised as transformers does"
        )
    return notes


def build_run(
    cfg: TrainConfig, env: DistEnv, stop_request: StopRequest, given: frozenset[str] = frozenset()
) -> loop.Run:
    precision = engine.resolve_precision(cfg.precision, env.device)  # refuses an emulated bf16
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    per_node = cfg.cache_scope == "node"  # downloads land in each node's cache, unless nodes share one
    main_decides(env, lambda: tracking.use_wandb(cfg.report_to))  # a missing W&B key is said before any work
    model_config = main_process_first(env, lambda: modeling.load_model_config(cfg), per_node)
    modeling.check_model_config(cfg, model_config)
    tokenizer = main_process_first(env, lambda: modeling.load_tokenizer(cfg), per_node)
    task_probe = probe.build_probe(cfg, tokenizer)  # a bad probe file is said before any data is prepared
    resume = choose_resume(cfg, env)
    plan = plan_run(cfg, env, precision, resume, given)
    bundle = (
        streaming.build_streaming_data(cfg, env, tokenizer)
        if cfg.streaming
        else cached.build_data(cfg, env, tokenizer, stop_request.raise_if_signalled)  # Ctrl-C stops a long one
    )
    model, loaded = main_process_first(
        env, lambda: modeling.build_model_reporting(cfg, model_config, tokenizer), per_node
    )
    if cfg.head_warmup_steps and split_encoder_head(model)[1] is None:
        raise UserError(
            f"--head_warmup_steps {cfg.head_warmup_steps}: this model's masked-LM head is not one mlm-ddp knows "
            "apart from its encoder (vocabulary logits at every position), so it cannot train alone; drop the option"
        )
    model = model.to(env.device)
    main_only(env, lambda: checkpoint.check_free_space(cfg.output_dir, model) if cfg.do_train else None)
    length = loop.run_length(cfg, plan, bundle.train.micro_per_epoch)
    trainable = engine.build_trainable(cfg, model, precision, env.device, length.total_steps, plan.layout.global_batch)
    state = checkpoint.TrainState(
        world_size=env.world_size,
        per_device_train_batch_size=plan.layout.per_device,
        gradient_accumulation_steps=plan.layout.accumulation,
        precision=precision,
    )
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank; a resume restores the saved states
    swa = WeightAverage(model, cfg.swa_start_step) if cfg.swa_start_step else None
    # What later checkpoints record and a resume must find unchanged (rank 0 saves; the others hold None).
    best_by = probe.selection_name(cfg, task_probe)
    if best_by != "perplexity":
        best_by += f" of {task_probe.rows.identity()}"
    identity = main_decides(
        env, lambda: checkpoint.resume_identity(cfg, model.config, tokenizer, bundle.eval_loader.dataset, best_by)
    )
    if resume:
        rngs = checkpoint.RankRngs(env.rank, world_size=env.world_size, seed=cfg.seed)
        main_decides(env, lambda: checkpoint.check_comparable(resume, identity))
        checkpoint.load_checkpoint(resume, state, model, loop.checkpoint_parts(trainable, swa, rngs), env.device)
        data_states = state.extra.get("data_states") or []  # a stream's position per rank ({} otherwise)
        bundle.train.load_state_dict(data_states[env.rank] if len(data_states) == env.world_size else {})
    if identity is not None:
        state.extra["comparable"] = identity
    if env.distributed:
        trainable = replace(trainable, wrapped=wrap_ddp(trainable.loss, env))
    run_config = {
        **cfg.to_dict(),
        # What the run trains with: on a resume, the accumulation and step budget derived from the checkpoint.
        "gradient_accumulation_steps": plan.layout.accumulation,
        "max_train_steps": plan.max_train_steps,
        "world_size": env.world_size,
        "device": str(env.device),
        "precision_resolved": precision,
        "attention_resolved": modeling.attention_kernel(model),
        "head_path": head_path(model),
        "versions": versions(),
        "global_batch_size": plan.layout.global_batch,
    }

    def write_run_config() -> None:
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, "run_config.json")
        before = read_json(path) if resume and os.path.isfile(path) else {}
        # Every (world size, device, precision) the run has had, in order: a run moved between machines says so.
        had = before.get("hardware_history") or (
            [{k: before[k] for k in ("world_size", "device", "precision_resolved") if k in before}] if before else []
        )
        now = {"world_size": env.world_size, "device": str(env.device), "precision_resolved": precision}
        run_config["hardware_history"] = had + ([now] if not had or had[-1] != now else [])
        write_json_atomic(path, run_config)

    writes.write_on_main(env, cfg.output_dir, state.step, "run_config.json", write_run_config)
    tracker = tracking.Tracker(
        cfg,
        run_config,
        is_main=env.is_main,
        start=(state.step, state.tracker_run_id),
        total_steps=length.total_steps,
        sample_rows=sample_rows,
    )
    peak, peak_source = peak_flops(env, precision)
    run = loop.Run(
        cfg=cfg,
        plan=plan,
        env=env,
        trainable=trainable,
        masking=engine.build_masking(cfg, tokenizer),
        data=bundle,
        tokenizer=tokenizer,
        state=state,
        length=length,
        throughput=metrics.Throughput(metrics.MlmShape.from_config(model.config), peak),
        tracker=tracker,
        stop_request=stop_request,
        swa=swa,
        probe=task_probe,
        loaded=loaded,
    )
    tracker.write(banner(run, resume, peak_source))
    return run


def evaluate_only(run: loop.Run) -> None:
    """--do_train false: the model as given, on the validation split (eval_results.json) and on the test split
    when there is one (test_results.json), exactly as a training run evaluates."""
    results = {
        "eval": engine.evaluate(run.trainable.loss, run.data.eval_loader, run.env, run.masking, run.trainable.precision)
    }
    if run.data.test_loader is not None:
        results["test"] = engine.evaluate(
            run.trainable.loss, run.data.test_loader, run.env, run.masking, run.trainable.precision
        )
    files = {"eval": "eval_results.json", "test": finish.TEST_RESULTS}

    def write() -> None:
        for split, metrics_ in results.items():
            write_json_atomic(os.path.join(run.cfg.output_dir, files[split]), metrics_)
        run.tracker.summary({f"{split}/{k}": v for split, m in results.items() for k, v in m.items()})

    writes.write_on_main(run.env, run.cfg.output_dir, run.state.step, "eval_results.json", write)
    if run.env.is_main:
        for split, metrics_ in results.items():
            print(f"{split}: " + json.dumps(metrics_), flush=True)


def train(cfg: TrainConfig, env: DistEnv, stop_request: StopRequest, given: frozenset[str]) -> None:
    """given: the options the user set (command line or --config file), as opposed to defaults."""
    # Held before anything in output_dir is read or changed (invariant 9): a second launch refuses here.
    lock = main_decides(env, lambda: runlock.acquire(cfg.output_dir))
    try:
        run_locked(cfg, env, stop_request, lock, given)
    finally:
        if lock is not None:
            lock.release()


def run_locked(
    cfg: TrainConfig, env: DistEnv, stop_request: StopRequest, lock: Optional[runlock.RunLock], given: frozenset[str]
) -> None:
    run = build_run(cfg, env, stop_request, given)
    run.lock = lock
    try:
        if not cfg.do_train:
            return evaluate_only(run)
        state = loop.fit(run)
        finish.test_best(run, examples=sample_rows)  # and the final model card, with example predictions
        if cfg.wandb_log_model:
            run.tracker.log_model(os.path.join(cfg.output_dir, "best"))
    finally:
        run.tracker.close()
    ranks_agree = loop.same_step_on_all_ranks(state.step, env)
    if env.is_main:
        how = "stopped early" if state.stopped_early else "finished"
        print(
            f"{how} at step {state.step} on all {env.world_size} ranks"
            if ranks_agree
            else f"ranks disagree on the final step (rank 0 at {state.step})",
            flush=True,
        )
        print(
            f"best {loop.best_name(run)} {state.best_metric:.4f} at step {state.best_step}; best model in "
            f"{os.path.join(cfg.output_dir, 'best')}",
            flush=True,
        )


def report_failure(e: BaseException, rank: int) -> int:
    """The exit code of a run that raised: each kind of failure said once, by the rank that knows it."""
    if isinstance(e, UserError):
        return report_user_error(e, rank)
    if isinstance(e, OutOfTime):
        if rank == 0:
            print(
                f"{e}; checkpoint saved. Run the same command again to resume (exit code {e.exit_code})",
                file=sys.stderr,
                flush=True,
            )
        return e.exit_code
    if isinstance(e, StoppedPreparing):  # on the rank preparing the data; the others wait for it and end quietly
        print(
            f"{e} while preparing the data, before the first step: nothing to save, and the unfinished cache "
            f"entry was removed. Run the same command again to start (exit code {e.exit_code})",
            file=sys.stderr,
            flush=True,
        )
        return e.exit_code
    if isinstance(e, Preempted):
        if rank == 0:
            print(
                f"{e} at a step boundary on every rank; checkpoint saved. Run the same command again to resume "
                f"(exit code {e.exit_code})",
                file=sys.stderr,
                flush=True,
            )
        return e.exit_code
    if isinstance(e, DiskFull):
        if str(e):  # rank 0's, naming the directory and the newest intact checkpoint; the others end quietly
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    if is_disk_full(e):  # a write elsewhere (the tokenised cache, a download), on whichever rank it happened
        where = getattr(e, "filename", None) or os.getcwd()
        print(
            f"error: rank {rank}: no space left on the disk of {where} ({free_bytes(where) / 2**30:.2f} GiB "
            f"free): {e}. Free space (or point --data_cache_dir / HF_HOME elsewhere) and run the same command",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_DISK_FULL
    if isinstance(e, loop.NonFiniteLoss):
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    if is_peer_failure(e):
        return EXIT_FAILURE  # another rank failed (or left) and reports its own error: this one ends quietly
    line = describe_failure(e, rank)
    if line is None:
        raise e  # a real error on this rank: its traceback, recorded for torchrun by @record
    print(f"error: {line}", file=sys.stderr, flush=True)  # NCCL/gloo itself failed: every rank that saw it
    return EXIT_FAILURE


@record  # torchelastic's error file: torchrun names the failing rank and its error once, in its summary
def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --max_runtime counts from here
    rank = env_rank()
    quiet_logging(logging.INFO if rank == 0 else logging.WARNING)  # user-facing output comes from rank 0
    stop_request: Optional[StopRequest] = None
    env: Optional[DistEnv] = None
    if stopped_on_a_user_error():
        return EXIT_USER_ERROR  # launch.sh exits 2 after torchrun's last attempt; the line was said once
    try:
        cfg, given = parse_command_line(argv)
        env = init_distributed(cfg.ddp_timeout)
        budget = runtime_seconds(cfg.max_runtime) if cfg.max_runtime else None
        stop_request = StopRequest(cfg.stop_grace_seconds, env.control, budget, started).install()
        train(cfg, env, stop_request, given)
        return 0
    except Exception as e:
        if stop_request is not None and stop_request.signum and is_peer_failure(e):
            return 128 + stop_request.signum  # a rank waiting for a preparation that the same signal stopped
        return report_failure(e, rank)
    finally:
        if stop_request is not None:
            stop_request.uninstall()
        teardown(env)


if __name__ == "__main__":
    sys.exit(main())
