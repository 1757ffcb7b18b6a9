"""Masked-LM fine-tuning on PyTorch DDP.

    torchrun --nproc_per_node=2 train_ddp.py [options]      # python train_ddp.py --help lists them

parse -> distributed setup -> build (tokenizer, data, model, optimizer) -> resume -> train -> teardown.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from mlm.config import TrainConfig, UserError, parse_args
from mlm.distributed import DistEnv, WaitedTooLong, any_rank, broadcast_object, describe_failure, env_rank, \
    init_distributed, is_peer_failure, main_only, main_process_first, teardown
from mlm.loop import NonFiniteLoss
from mlm.preemption import Preempted, StopRequest

# Exit codes (README, "Exit codes"): 0 done; 1 a failure (this rank's traceback or one line naming a failure of
# NCCL/gloo, or another rank's failure); 2 a user error, one line; 3 the loss stayed non-finite; 128 + signal
# (143 SIGTERM, 130 SIGINT) stopped with a checkpoint.
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
USER_ERROR_GRACE_S = 3.0
log = logging.getLogger("mlm")


def setup_logging(rank: int) -> None:
    # Non-zero ranks log at WARNING; user-facing output comes from rank 0.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    import transformers
    transformers.logging.set_verbosity_error()  # the load report of a fresh MLM head is noise here
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def versions() -> dict[str, str]:
    import importlib.metadata
    found = {}
    for name in ("torch", "transformers", "datasets", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # datasets is needed only for Hub data and streaming
            found[name] = "not installed"
    return found


def build_run(cfg: TrainConfig, env: DistEnv, stop_request: StopRequest):
    import torch
    from mlm import checkpoint, data, engine, loop, masking, metrics, modeling, tracking
    from mlm.distributed import dist_sum
    from mlm.swa import WeightAverage

    precision = engine.resolve_precision(cfg.precision, env.device)  # refuses an emulated bf16
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    per_node = cfg.cache_scope == "node"  # downloads land in each node's cache, unless nodes share one
    model_config = main_process_first(env, lambda: modeling.load_model_config(cfg), per_node)
    modeling.check_model_config(cfg, model_config)
    tokenizer = main_process_first(env, lambda: modeling.load_tokenizer(cfg), per_node)
    resume = main_process_first(env, lambda: checkpoint.choose_resume(
        cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir) if env.is_main and cfg.do_train
        else None)
    resume = broadcast_object(resume, env)
    if resume and any_rank(not os.path.isdir(resume), env):
        raise UserError(f"checkpoint {resume!r} is not visible on every node; every rank reads it on resume, so "
                        "with several nodes put --output_dir on a filesystem they all share")
    bundle = data.build_data(cfg, env, tokenizer)
    model = main_process_first(env, lambda: modeling.build_model(cfg, model_config, tokenizer), per_node)
    model = model.to(env.device)
    main_only(env, lambda: checkpoint.check_free_space(cfg.output_dir, model) if cfg.do_train else None)
    loss_module = modeling.MaskedLMLoss(model, compile_encoder=cfg.torch_compile,
                                        label_smoothing=cfg.label_smoothing)
    optimizer = modeling.build_optimizer(cfg, loss_module, env.device)
    micro_per_epoch = bundle.train.micro_per_epoch
    steps_per_epoch, total_steps = loop.total_train_steps(cfg, micro_per_epoch)
    scheduler = modeling.build_scheduler(cfg, optimizer, total_steps)
    scaler = engine.build_scaler(precision, env.device)
    state = checkpoint.TrainState(world_size=env.world_size,
                                  per_device_train_batch_size=cfg.per_device_train_batch_size)
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank; a resume restores the saved states
    swa = WeightAverage(model, cfg.swa_start_step) if cfg.swa_start_step else None
    if resume:
        checkpoint.load_checkpoint(resume, state, model, optimizer, scheduler, scaler, env.rank, env.device, swa)
        bundle.train.load_state_dict(state.extra.get("data_states", [{}] * env.world_size)[env.rank])
    # Gradients as views into DDP's all-reduce buckets: one copy fewer per step (measured in bench/scaling.py).
    ddp = build_ddp(loss_module, env) if env.distributed else loss_module
    global_batch = cfg.per_device_train_batch_size * env.world_size * cfg.gradient_accumulation_steps
    run_config = {**cfg.to_dict(), "world_size": env.world_size, "device": str(env.device),
                  "precision_resolved": precision, "global_batch_size": global_batch, "versions": versions()}
    if env.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        checkpoint.write_json_atomic(os.path.join(cfg.output_dir, "run_config.json"), run_config)
    tracker = tracking.Tracker(cfg, env.is_main, total_steps, state.step,
                               checkpoint.read_history(cfg.output_dir) if env.is_main else [], run_config,
                               state.tracker_run_id)
    peak, peak_source = metrics.device_peak(env.device, precision)  # every rank at once, as in training
    peak_total = float(dist_sum(torch.tensor([peak], dtype=torch.float64, device=env.device)).item())
    tables = masking.build_masking_tables(tokenizer)  # on the host: prepare_batch masks there
    spec = masking.MaskingSpec(cfg.mlm_probability, cfg.mask_replace_prob, cfg.random_replace_prob,
                               cfg.whole_word_mask, cfg.seed)
    if cfg.whole_word_mask and not bool(tables.continuation.any()):
        raise UserError("--whole_word_mask needs a WordPiece tokenizer (## continuation pieces); this one has none")
    s = bundle.stats
    tracker.write("mlm-ddp\n" + tracking.format_banner({
        "model": f"{cfg.model_name_or_path or 'from scratch: ' + str(cfg.config_name or 'BertConfig')} "
                 f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)",
        "world size / device": f"{env.world_size} x {env.device.type} ({'nccl' if env.device.type == 'cuda' else 'gloo'})",
        "precision": f"{precision}{' + GradScaler' if scaler.is_enabled() else ''}",
        "global batch": f"{global_batch} = {cfg.per_device_train_batch_size} per device x {env.world_size} "
                        f"processes x {cfg.gradient_accumulation_steps} accumulation",
        "steps": f"{steps_per_epoch or 'unknown (a stream)'} per epoch, {total_steps} total, "
                 f"{modeling.warmup_steps(cfg, total_steps)} warmup ({cfg.lr_scheduler_type})",
        "train": s["train"],
        "eval": s["eval"],
        "data": s["data"],
        "peak (for MFU)": f"{peak_total / 1e12:.3g} TFLOP/s over {env.world_size} rank(s) ({peak_source})",
        "output": cfg.output_dir + (f" (resuming from {resume}, step {state.step})" if resume else ""),
    }))
    return loop.Run(cfg, env, loss_module, ddp, optimizer, scheduler, scaler, tokenizer, bundle, spec, tables,
                    precision, state, tracker, total_steps, micro_per_epoch, stop_request,
                    metrics.MlmShape.from_config(model.config), peak_total, swa)


def build_ddp(module, env: DistEnv):
    """DDP with gradients as views into its all-reduce buckets (one copy fewer per step, measured in
    bench/scaling.py) and no buffer broadcast before every forward: BERT's buffers (position and token-type
    ids) are constants. torch 2.13 renamed that option; older releases know only the old name."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, **{no_sync: False})


def evaluate_only(run) -> None:
    from mlm import checkpoint, engine
    metrics = engine.evaluate(run.loss_module, run.data.eval_loader, run.env, run.spec, run.tables, run.precision)
    if run.env.is_main:
        checkpoint.write_json_atomic(os.path.join(run.cfg.output_dir, "eval_results.json"), metrics)
        print("eval: " + json.dumps(metrics), flush=True)


def train(cfg: TrainConfig, env: DistEnv, stop_request: StopRequest) -> None:
    from mlm import loop
    run = build_run(cfg, env, stop_request)
    try:
        if not cfg.do_train:
            return evaluate_only(run)
        state = loop.fit(run)
        if cfg.wandb_log_model:
            run.tracker.log_model(os.path.join(cfg.output_dir, "best"))
    finally:
        run.tracker.close()
    ranks_agree = loop.same_step_on_all_ranks(state.step, env)
    if env.is_main:
        how = "stopped early" if state.stopped_early else "finished"
        print(f"{how} at step {state.step} on all {env.world_size} ranks" if ranks_agree else
              f"ranks disagree on the final step (rank 0 at {state.step})", flush=True)
        print(f"best perplexity {state.best_metric:.4f} at step {state.best_step}; best model in "
              f"{os.path.join(cfg.output_dir, 'best')}", flush=True)


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (--max-restarts); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@record  # torchelastic's error file: torchrun names the failing rank and its error once, in its summary
def main(argv: list[str] | None = None) -> int:
    rank = env_rank()
    setup_logging(rank)
    stop_request = None
    try:
        cfg = parse_args(argv)
        if restart_count() > 0 and cfg.overwrite_output_dir:
            # A restarted attempt continues its own run: overwriting would delete the checkpoints it resumes from.
            cfg.overwrite_output_dir = False
        env = init_distributed(cfg.ddp_timeout)
        stop_request = StopRequest(cfg.stop_grace_seconds, env.control).install()
        train(cfg, env, stop_request)
        return 0
    except UserError as e:
        # Every rank sees the same error; one line from rank 0 is enough, unless only this rank saw it.
        if rank == 0 or isinstance(e, WaitedTooLong):
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun stops the other workers as soon as one exits: leave rank 0 time to print the error.
            time.sleep(USER_ERROR_GRACE_S)
        return EXIT_USER_ERROR
    except Preempted as e:
        if rank == 0:
            print(f"{e} at a step boundary on every rank; checkpoint saved. Run the same command again to resume "
                  f"(exit code {e.exit_code})", file=sys.stderr, flush=True)
        return e.exit_code
    except NonFiniteLoss as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except Exception as e:
        if is_peer_failure(e):
            # Another rank failed (or left) and reports its own error; this one ends quietly, so it is told once.
            return EXIT_FAILURE
        line = describe_failure(e, rank)
        if line is None:
            raise  # a real error on this rank: its traceback, recorded for torchrun by @record
        print(f"error: {line}", file=sys.stderr, flush=True)  # NCCL/gloo itself failed: every rank that saw it
        return EXIT_FAILURE
    finally:
        if stop_request is not None:
            stop_request.uninstall()
        teardown()


if __name__ == "__main__":
    sys.exit(main())
