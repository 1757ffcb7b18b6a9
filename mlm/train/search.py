"""Hyperparameter search with Optuna: every trial a real training run, the study kept in a database.

    python -m mlm.train.search --study_name NAME --storage sqlite:///search.db --n_trials N [--n_jobs J] \\
        --config base.yaml [--nproc_per_trial G] [--output_dir searches/NAME]

base.yaml holds train_ddp.py options plus a `search_space` mapping, one entry per option searched:

    learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # float, log-uniform
    num_warmup_steps: {low: 0, high: 200}                     # both bounds whole numbers: int
    per_device_train_batch_size: {choices: [16, 32, 64]}      # categorical

Each trial writes its options to <output_dir>/trial-<n>/trial.yaml and runs `python train_ddp.py --config ...`
(or `torchrun --standalone --nproc_per_node G` with --nproc_per_trial G > 1). Its objective is the best
evaluation perplexity of the run (minimised). The TPE sampler proposes the values; the median pruner stops a
trial whose perplexity at an evaluation is worse than the median of earlier trials at the same step (the
trial's run gets SIGTERM, saves and stops). The study lives in --storage: the same command again adds
--n_trials more trials; trials left running by a killed search are marked failed and retried once. At the end
it prints the best trial and the parameter importances, and writes the best trial's options as
<output_dir>/best.yaml, ready for `train_ddp.py --config`. optuna is an optional extra (pip install -e .[search]).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from mlm.common.cli import Parser, UserError, command_line
from mlm.common.files import eval_entries, read_history
from mlm.config import TrainConfig, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # beside mlm/: train_ddp.py
POLL_S = 0.5


# ---------------------------------------------------------------------- the search space
def read_search_config(path: str) -> tuple[dict[str, Any], dict[str, dict]]:
    """(base train options, search space) from the YAML; both checked before any trial starts."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"--config {path!r} does not exist; give the base YAML with a search_space mapping")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {path!r} could not be parsed ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("search_space"), dict) or not data["search_space"]:
        raise UserError(
            f"--config {path!r} needs a non-empty search_space mapping of option names to ranges, "
            "e.g. learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}"
        )
    space = data.pop("search_space")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, spec in space.items():
        if name not in known:
            raise UserError(f"search_space: {name!r} is not a train_ddp.py option")
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
            raise UserError(
                f"search_space.{name}: give {{low: A, high: B}} (optionally log: true) or {{choices: [...]}}"
            )
        if "choices" in spec and not (isinstance(spec["choices"], list) and spec["choices"]):
            raise UserError(f"search_space.{name}.choices must be a non-empty list")
        if "low" in spec and not (
            isinstance(spec["low"], (int, float))
            and isinstance(spec["high"], (int, float))
            and spec["low"] < spec["high"]
        ):
            raise UserError(
                f"search_space.{name}: low and high must be numbers with low < high, got "
                f"{spec['low']!r} and {spec['high']!r}"
            )
        if spec.get("log") and "low" in spec and spec["low"] <= 0:
            raise UserError(f"search_space.{name}: a log range needs low > 0, got {spec['low']}")
    return data, space


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"])
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values


def write_yaml(path: str, values: dict[str, Any]) -> None:
    import yaml

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(values, fh, sort_keys=False)
    os.replace(tmp, path)


def check_options(values: dict[str, Any], where: str) -> None:
    """The same checks train_ddp.py makes, on a set of options, before a process is started for it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "options.yaml")
        write_yaml(path, values)
        try:
            parse_args(["--config", path])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


# ---------------------------------------------------------------------- one trial
def _evals(run_dir: str) -> list[tuple[int, float]]:
    """(step, perplexity) of each evaluation the trial's run has written so far ([] before the first)."""
    return [(e["step"], e["perplexity"]) for e in eval_entries(read_history(run_dir) or [])]


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the run saves a checkpoint at the next step and exits
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_trial(trial, base: dict[str, Any], space: dict[str, dict], args) -> float:
    import optuna

    params = suggest(trial, space)
    trial_dir = os.path.abspath(os.path.join(args.output_dir, f"trial-{trial.number}"))
    os.makedirs(trial_dir, exist_ok=True)
    options = {**base, **params, "output_dir": os.path.join(trial_dir, "run"), "overwrite_output_dir": True}
    config_path = os.path.join(trial_dir, "trial.yaml")
    write_yaml(config_path, options)
    launcher = (
        [sys.executable]
        if args.nproc_per_trial == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_trial}"]
    )
    with open(os.path.join(trial_dir, "train.log"), "w") as log:
        proc = subprocess.Popen(
            [*launcher, os.path.join(ROOT, "train_ddp.py"), "--config", config_path],
            cwd=os.getcwd(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # its own group: a stop reaches torchrun's workers too
        reported: set[int] = set()
        try:
            while True:
                done = proc.poll() is not None
                for step, ppl in _evals(os.path.join(trial_dir, "run")):
                    if step in reported or step == 0:  # step 0 is the untrained baseline, the same for all
                        continue
                    reported.add(step)
                    trial.report(ppl if math.isfinite(ppl) else 1e308, step)
                    if trial.should_prune():
                        _stop(proc)
                        print(f"trial {trial.number}: pruned at step {step} (perplexity {ppl:.3f})", flush=True)
                        raise optuna.TrialPruned(f"perplexity {ppl:.3f} at step {step}")
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            _stop(proc)
    if proc.returncode != 0:
        tail = open(os.path.join(trial_dir, "train.log"), errors="replace").read().strip().splitlines()[-3:]
        raise RuntimeError(f"trial {trial.number}: train_ddp.py exited {proc.returncode}: {' | '.join(tail)}")
    evals = [p for _, p in _evals(os.path.join(trial_dir, "run"))]
    value = min(evals)
    print(f"trial {trial.number}: best perplexity {value:.3f} with {params}", flush=True)
    return value


# ---------------------------------------------------------------------- the study
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m mlm.train.search",
        description="Optuna search over train_ddp.py options (TPE sampler, "
        "median pruning on evaluation perplexity); each trial a real training run.",
    )
    p.add_argument("--study_name", required=True, help="Name of the study in --storage (same name: resume it).")
    p.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///search.db.")
    p.add_argument("--config", required=True, help="Base YAML: train_ddp.py options and a search_space mapping.")
    p.add_argument("--n_trials", type=int, required=True, help="Trials to run in this invocation.")
    p.add_argument("--n_jobs", type=int, default=1, help="Trials at a time (default 1).")
    p.add_argument(
        "--nproc_per_trial",
        type=int,
        default=1,
        help="Processes per trial: 1 runs python, more runs torchrun --standalone (e.g. the GPU count).",
    )
    p.add_argument("--output_dir", default=None, help="Where trials run (default: searches/<study_name>).")
    p.add_argument("--seed", type=int, default=42, help="Sampler seed.")
    p.add_argument("--pruner_startup_trials", type=int, default=2, help="Completed trials before pruning starts.")
    p.add_argument("--pruner_warmup_steps", type=int, default=0, help="Steps of a trial before it can be pruned.")
    return p


def open_study(args):
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    try:
        storage = (
            RDBStorage(
                args.storage,
                heartbeat_interval=30,
                grace_period=90,
                failed_trial_callback=RetryFailedTrialCallback(max_retry=1),
            )
            if not args.storage.startswith("memory")
            else None
        )
    except Exception as e:
        raise UserError(
            f"--storage {args.storage!r} could not be opened ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); give a database URL such as sqlite:///search.db"
        ) from None
    return optuna.create_study(
        study_name=args.study_name,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=args.pruner_startup_trials, n_warmup_steps=args.pruner_warmup_steps
        ),
    )


def report(study, base: dict[str, Any], output_dir: str) -> Optional[str]:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
        for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    }
    print(
        f"study {study.study_name}: {len(study.trials)} trials ({counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed)"
    )
    if not complete:
        print("no complete trial yet: nothing to report")
        return None
    best = study.best_trial
    print(f"best trial {best.number}: perplexity {best.value:.4f}")
    for k, v in best.params.items():
        print(f"  {k}: {v}")
    if len(complete) >= 2:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
        print("parameter importances (PED-ANOVA): " + ", ".join(f"{k} {v:.3f}" for k, v in importances.items()))
    path = os.path.join(output_dir, "best.yaml")
    write_yaml(
        path, {**{k: v for k, v in base.items() if k not in ("output_dir", "overwrite_output_dir")}, **best.params}
    )
    print(f"best options written to {path}: python train_ddp.py --config {path}")
    return path


@command_line
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import optuna
    except ImportError:
        raise UserError(
            "the search needs the optional package optuna; pip install -r requirements-extras.txt"
        ) from None
    for name in ("n_trials", "n_jobs", "nproc_per_trial"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    base, space = read_search_config(args.config)
    check_options(base, f"--config {args.config!r}")
    args.output_dir = args.output_dir or os.path.join("searches", args.study_name)
    os.makedirs(args.output_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(args)
    before = len(study.trials)
    study.optimize(
        lambda t: run_trial(t, base, space, args), n_trials=args.n_trials, n_jobs=args.n_jobs, catch=(RuntimeError,)
    )
    print(f"ran {len(study.trials) - before} trial(s) in this invocation")
    report(study, base, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
