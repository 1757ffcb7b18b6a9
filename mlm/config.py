"""TrainConfig: one typed dataclass, Hugging Face argument names, every value checked before any work.

The command line is transformers' HfArgumentParser over the dataclass, so a field, its type, its default, its
choices and its help live in one place. On top of it, only what it lacks: `--config FILE` (YAML or JSON) whose
values the command line overrides, `--no_FLAG` for every flag (HfArgumentParser adds it only to flags that
default to true), and one-line errors instead of argparse's usage dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from mlm.common.cli import EXIT_USER_ERROR, OUTPUTS_ROOT, OneLineErrors, UserError, command_line, looks_like_path
from mlm.common.files import has_tokenizer_files, input_in_run_dir
from mlm.common.workers import env_rank, report_user_error, stopped_on_a_user_error

DEFAULT_MODEL = "bert-base-uncased"
DEFAULT_DATASET, DEFAULT_DATASET_CONFIG = "wikitext", "wikitext-2-raw-v1"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# transformers' schedules that are a function of the step (reduce_lr_on_plateau and greedy follow a metric
# instead); tests/test_adaptation.py fails when transformers adds one.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
REPORT_TO = ("all", "wandb", "none")
PROBE_TASKS = ("auto", "classification", "regression")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BEST_METRICS = ("perplexity", "probe")
CACHE_SCOPES = ("node", "shared")
ATTENTION_KERNELS = ("auto", "sdpa", "eager", "flash_attention_2")
TEXT_ERRORS = ("error", "replace", "skip")  # what --text_errors does with undecodable bytes (mlm.data.cleaning)
# The local files a run reads (mlm.data.sources reads them; the checks here accept them).
LOCAL_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet", ".csv")
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw"}
WIKITEXT_TEST = "wiki.test.raw"  # optional: when present, the final best/ is evaluated on it


def default_cache_dir() -> str:
    """Where tokenised data is cached without --data_cache_dir: $XDG_CACHE_HOME/mlm-ddp, or ~/.cache/mlm-ddp."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlm-ddp")


def builder_for(path: str) -> str:
    """The `datasets` packaged builder that reads a local file of this kind."""
    suffix = path.rsplit(".", 1)[-1]
    return {"txt": "text", "raw": "text", "jsonl": "json"}.get(suffix, suffix)


# The sections of --help, in order; each field names its own.
GROUPS = {
    "model": "the model",
    "data": "the data",
    "masking": "masking",
    "training": "optimisation and precision",
    "evaluation": "evaluation, checkpoints, stopping",
    "probe": "the downstream probe (did it help your task?)",
    "output": "output and tracking",
}


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    """A field: its default, its help and its section of --help (one of GROUPS)."""
    assert group in GROUPS, group
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: Optional[str] = _f(
        None,
        f"Hub id or local directory of a pretrained masked LM (default {DEFAULT_MODEL} when neither "
        "--config_name nor --config_overrides is given; with either, the model is built from scratch).",
        "model",
    )
    config_name: Optional[str] = _f(None, "Config (Hub id or directory) to build a model from scratch.", "model")
    model_revision: str = _f(
        "main",
        "The Hub revision (branch, tag or commit) of the model, its config and its tokenizer: an intermediate "
        "checkpoint, or a commit pinned for reproducibility.",
        "model",
    )
    tokenizer_name: Optional[str] = _f(None, "Tokenizer (Hub id or directory); default: the model's.", "model")
    add_tokens: Optional[str] = _f(
        None,
        "Tokens to add to the tokenizer, a comma list or @FILE (one per line): markers ([LEAD]) or domain terms. "
        "They are masked like any word and start a word; the embeddings (and the output layer) grow to hold them, "
        "new rows initialised as transformers does.",
        "model",
    )
    add_special_tokens: Optional[str] = _f(
        None, "Special tokens to add, a comma list or @FILE (one per line): never masked, like [CLS].", "model"
    )
    config_overrides: Optional[str] = _f(
        None, "Overrides for a from-scratch config, e.g. 'num_hidden_layers=2,hidden_size=128'.", "model"
    )
    attn_implementation: str = _f(
        "auto",
        "Attention kernel: auto = transformers' own choice (SDPA where the model "
        "has it, eager where not, as DeBERTa); sdpa (fused scaled-dot-product); eager; "
        "flash_attention_2 (needs the flash-attn package and a GPU).",
        "model",
        choices=ATTENTION_KERNELS,
    )
    trust_remote_code: bool = _f(False, "Allow custom model code from the Hub (off: only transformers' own).", "model")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.", "model")
    torch_compile: bool = _f(
        False,
        "torch.compile the training forward (encoder, head at the masked positions, loss) as one "
        "graph with fixed shapes (an epoch's last batch is filled with empty examples, "
        "--line_by_line batches are padded to --max_seq_length, the masked positions to a "
        "capacity fixed by the batch shape); evaluation stays eager. Pays on GPUs; the first "
        "step compiles.",
        "model",
    )
    torch_compile_mode: str = _f(
        "default",
        "torch.compile's mode with --torch_compile: default (kernels fused, launched one by one); reduce-overhead "
        "(the step's forward and backward captured as CUDA graphs, replayed with one launch: for a GPU whose "
        "steps wait on the host); max-autotune, max-autotune-no-cudagraphs (longer compiles, tuned matmuls).",
        "model",
        choices=COMPILE_MODES,
    )
    tf32: bool = _f(True, "Allow TF32 matmuls for fp32 work on Ampere and newer GPUs (no effect elsewhere).", "model")
    # --- data ---
    dataset_name: Optional[str] = _f(
        DEFAULT_DATASET, "Hub dataset name (ignored with --train_file or --dataset_dir).", "data"
    )
    # None, not wikitext's configuration: another --dataset_name must not inherit wikitext-2-raw-v1.
    dataset_config_name: Optional[str] = _f(
        None,
        f"Hub dataset configuration name ({DEFAULT_DATASET_CONFIG} when --dataset_name is {DEFAULT_DATASET}).",
        "data",
    )
    train_file: Optional[list[str]] = _f(
        None,
        "Local training text, one or more paths or globs (data/*.csv): "
        ".txt/.raw (a text per line), .json/.jsonl, .parquet or .csv (the "
        "--text_column column(s)). The files of one split share a format.",
        "data",
    )
    validation_file: Optional[list[str]] = _f(
        None, "Local validation text: paths or globs, same formats as --train_file.", "data"
    )
    test_file: Optional[list[str]] = _f(
        None,
        "Local test text: paths or globs, same formats as --train_file: at "
        "the end, best/ is evaluated on it exactly like validation "
        "(test_results.json). Default: the source's own test split when it has one "
        "(the Hub's 'test', wiki.test.raw in --dataset_dir).",
        "data",
    )
    text_column: Optional[str] = _f(
        None,
        "The column holding the text in csv/json/parquet files and Hub datasets "
        "(default 'text'), or several, NAME,NAME, joined by --text_separator (a prompt "
        "and a response). Rows whose joined text is empty are skipped and counted.",
        "data",
    )
    text_separator: str = _f("\n", "What joins the --text_column columns of a row.", "data")
    dataset_dir: Optional[str] = _f(
        None,
        "Directory with WikiText raw files wiki.train.raw and wiki.valid.raw "
        "(and wiki.test.raw, the test split, when present).",
        "data",
    )
    validation_split_percentage: int = _f(
        5, "Percent of the training rows held out for validation when the source has no validation split.", "data"
    )
    max_seq_length: int = _f(128, "Tokens per example, [CLS] and [SEP] included.", "data")
    line_by_line: bool = _f(
        False, "One example per non-empty line (padded per batch) instead of packed chunks.", "data"
    )
    text_errors: str = _f(
        "error",
        "Bytes that are not UTF-8 and 'text' values that are not strings (null is an "
        "empty text): error = stop with the file and the byte offset or row; replace = U+FFFD for "
        "bad bytes (read as [UNK]), the value's text for numbers and lists; skip = drop the line "
        "or row. What was replaced or skipped is counted in the banner.",
        "data",
        choices=TEXT_ERRORS,
    )
    max_train_samples: Optional[int] = _f(
        None, "Keep only the first N training examples (debugging, quick runs).", "data"
    )
    max_eval_samples: Optional[int] = _f(
        None, "Keep only the first N evaluation examples (of the validation and of the test split).", "data"
    )
    preprocessing_num_workers: Optional[int] = _f(None, "Threads the fast tokenizer uses (default: all cores).", "data")
    data_cache_dir: Optional[str] = _f(
        None, "Where tokenised data is cached (default: $XDG_CACHE_HOME/mlm-ddp or ~/.cache/mlm-ddp).", "data"
    )
    cache_scope: str = _f(
        "node",
        "Who prepares downloads and the tokenised-data cache while the other processes "
        "wait: node = the first process of each node (local rank 0), right whether or not nodes "
        "share a disk; shared = global rank 0 alone, when every node sees the same "
        "--data_cache_dir and Hugging Face cache (saves the other nodes the work).",
        "data",
        choices=CACHE_SCOPES,
    )
    streaming: bool = _f(
        False,
        "Stream the training split (Hub dataset or local files) instead of tokenising it "
        "up front: sharded over all ranks, tokenised and packed in the loader workers, shuffled "
        "with a buffer. Needs --max_train_steps; the validation split is read whole.",
        "data",
    )
    shuffle_buffer_size: int = _f(
        10000, "With --streaming: texts held in the shuffle buffer (more mixes better, costs memory).", "data"
    )
    dataloader_num_workers: Optional[int] = _f(
        None,
        "Loader worker processes per rank (default: 1 with "
        "--streaming, where they tokenise beside training; 0 otherwise).",
        "data",
    )
    # --- masking ---
    mlm_probability: float = _f(0.15, "Fraction of maskable tokens selected for prediction.", "masking")
    eval_mlm_probability: Optional[float] = _f(
        None,
        "The selection rate of the fixed evaluation masks (default: --mlm_probability). ModernBERT's recipe "
        "trains at 0.3 and evaluates at 0.15, so its perplexities compare with other runs'.",
        "masking",
    )
    mask_replace_prob: float = _f(0.8, "Of the selected tokens, the fraction replaced by [MASK].", "masking")
    random_replace_prob: float = _f(
        0.1, "Of the selected tokens, the fraction replaced by a random token (the rest stay unchanged).", "masking"
    )
    whole_word_mask: bool = _f(
        False,
        "Select whole words: every piece of a chosen word is masked together. Words "
        "come from the vocabulary: WordPiece '##' pieces continue a word, byte-level BPE 'Ġ' "
        "and SentencePiece '▁' pieces start one.",
        "masking",
    )
    # --- optimisation ---
    per_device_train_batch_size: int = _f(32, "Training examples per process per micro-step.", "training")
    per_device_eval_batch_size: int = _f(64, "Evaluation examples per process per batch.", "training")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.", "training")
    learning_rate: float = _f(5e-5, "Peak AdamW learning rate.", "training")
    weight_decay: float = _f(0.01, "AdamW weight decay (never on biases and LayerNorm weights).", "training")
    adam_beta1: float = _f(0.9, "AdamW beta1.", "training")
    adam_beta2: float = _f(0.999, "AdamW beta2.", "training")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", "training")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).", "training")
    num_train_epochs: float = _f(10.0, "Epochs to train (early stopping may end sooner).", "training")
    max_train_steps: Optional[int] = _f(None, "Optimizer steps to train; overrides --num_train_epochs.", "training")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup.", "training", choices=SCHEDULERS)
    lr_scheduler_kwargs: Optional[str] = _f(
        None,
        "The schedule's own arguments as JSON, as transformers names them: '{\"min_lr_rate\": 0.1}' for "
        "cosine_with_min_lr, '{\"num_decay_steps\": 500}' for warmup_stable_decay (default: the last 10%% of "
        "the steps), '{\"num_cycles\": 2}' for cosine_with_restarts, '{\"power\": 2.0}' for polynomial.",
        "training",
    )
    num_warmup_steps: Optional[int] = _f(None, "Warmup steps; overrides --warmup_ratio.", "training")
    warmup_ratio: float = _f(0.06, "Warmup as a fraction of the total optimizer steps.", "training")
    layerwise_lr_decay: Optional[float] = _f(
        None,
        "Layer-wise learning-rate decay FACTOR in (0, 1]: the head (and pooler) train at --learning_rate, "
        "encoder layer i of L at learning_rate * FACTOR**(L - i), the embeddings at learning_rate * FACTOR**(L + 1) "
        "(the decoder tied to the word embeddings goes with them). Off by default.",
        "training",
    )
    head_warmup_steps: int = _f(
        0,
        "Train the masked-LM head alone for the first N optimizer steps (the encoder held exactly still), then "
        "everything: for a checkpoint without a trained MLM head (DeBERTa-v3, sentence encoders), whose fresh "
        "head would otherwise send noise into the encoder.",
        "training",
    )
    label_smoothing: float = _f(
        0.0,
        "Label smoothing of the training loss on the masked tokens (0 disables); "
        "evaluation loss and perplexity are always unsmoothed.",
        "training",
    )
    swa_start_step: Optional[int] = _f(
        None,
        "Stochastic weight averaging: from this optimizer step on, average the weights after every step "
        "(torch's AveragedModel); each evaluation also evaluates the average, and best/ is the averaged model "
        "when it is the better one. Off by default.",
        "training",
    )
    precision: str = _f(
        "auto",
        "auto: bf16 on GPUs of compute capability 8.0 and up (A100, A10, L4, L40S, H100), "
        "fp16 with GradScaler on older GPUs (T4, V100, P100), fp32 on CPU. bf16 on an older GPU is "
        "refused: it would be emulated, slower than fp16.",
        "training",
        choices=PRECISIONS,
    )
    seed: int = _f(42, "Seed for initialisation, shuffling and masks.", "training")
    # --- evaluation, checkpoints, stopping ---
    eval_steps: Optional[int] = _f(
        None,
        "Evaluate every N optimizer steps (default: at the end of each epoch; "
        "with --streaming, whose epochs have no known end, only at the last step).",
        "evaluation",
    )
    do_train: bool = _f(
        True, "Train; with --do_train false, only evaluate the model once and write eval_results.json.", "evaluation"
    )
    eval_on_start: bool = _f(True, "Evaluate once before training, as the baseline to beat.", "evaluation")
    save_steps: Optional[int] = _f(
        None,
        "Save a resumable checkpoint every N steps (default: at every evaluation); one is always saved at the end.",
        "evaluation",
    )
    save_total_limit: int = _f(2, "Keep only the newest N resumable checkpoints.", "evaluation")
    early_stopping_patience: int = _f(3, "Stop after N evaluations without improvement (0 disables).", "evaluation")
    early_stopping_min_delta: float = _f(
        0.0,
        "The --metric_for_best_model figure must improve by more than this to count as improvement.",
        "evaluation",
    )
    max_nonfinite_steps: int = _f(
        25,
        "Stop (exit code 3, keeping the last good checkpoint and best/) after N "
        "consecutive steps skipped for a non-finite loss or gradient; checked every "
        "logging_steps (0 disables).",
        "evaluation",
    )
    stop_grace_seconds: float = _f(
        25.0,
        "After SIGTERM/SIGINT, exit anyway if the agreed stop and its checkpoint "
        "are not done within this many seconds (torchrun kills workers after 30).",
        "evaluation",
    )
    ddp_timeout: int = _f(1800, "Process-group timeout in seconds (a collective waiting longer fails).", "evaluation")
    max_runtime: Optional[str] = _f(
        None,
        "A time budget (11h30m, 90m, 3600 = seconds) counted from the start: the "
        "run stops at a step boundary early enough that its checkpoint is on disk "
        "before the budget ends (exit code 5); the same command resumes.",
        "evaluation",
    )
    metric_for_best_model: str = _f(
        "perplexity",
        "What picks best/ and drives early stopping: perplexity (lower is better), or probe (the downstream "
        "probe of --probe_file: macro-F1 for classes, RMSE for numbers).",
        "evaluation",
        choices=BEST_METRICS,
    )
    # --- the downstream probe ---
    probe_file: Optional[list[str]] = _f(
        None,
        "Labelled texts of your task (csv/json/jsonl/parquet, paths or globs as for --train_file): at every "
        "evaluation, and once on the model as loaded, a cross-validated linear probe on the encoder's mean-pooled "
        "features says whether the adaptation helps the task (needs scikit-learn: pip install 'mlm-ddp[probe]').",
        "probe",
    )
    probe_text_column: Optional[str] = _f(
        None, "The probe file's text column(s), NAME or NAME,NAME (default: --text_column, else 'text').", "probe"
    )
    probe_label_column: str = _f("label", "The probe file's label column.", "probe")
    probe_task: str = _f(
        "auto",
        "auto: text labels are classes, numbers a regression (an essay score); classification or regression "
        "to say so (classification for numeric class ids).",
        "probe",
        choices=PROBE_TASKS,
    )
    probe_folds: int = _f(5, "Cross-validation folds of the probe (fixed by --seed).", "probe")
    max_probe_samples: Optional[int] = _f(
        None,
        "Probe a sample of this many rows of --probe_file (drawn once by --seed, each class in its share): the "
        "probe costs a forward pass over its rows at every evaluation, and a few thousand rows give steady "
        "figures (default: every row).",
        "probe",
    )
    # --- output ---
    output_dir: Optional[str] = _f(None, "Run directory (default: outputs/<model>-<dataset>).", "output")
    overwrite_output_dir: bool = _f(
        False,
        "Start afresh in a non-empty output_dir (deletes what runs wrote there, by name; nothing else).",
        "output",
    )
    resume_from_checkpoint: Optional[str] = _f(
        None,
        "auto (newest checkpoint in output_dir; the default when one exists), none, or a checkpoint path.",
        "output",
    )
    report_to: str = _f(
        "all",
        "Trackers: wandb, none, or all (wandb when it is installed and has a key or WANDB_MODE=offline).",
        "output",
        choices=REPORT_TO,
    )
    wandb_project: Optional[str] = _f(None, "W&B project (default: $WANDB_PROJECT, else mlm-ddp).", "output")
    wandb_entity: Optional[str] = _f(
        None, "W&B entity, a user or team (default: $WANDB_ENTITY, else your default entity).", "output"
    )
    wandb_run_name: Optional[str] = _f(None, "W&B run name (default: $WANDB_NAME, else the output_dir name).", "output")
    wandb_tags: Optional[str] = _f(None, "Comma-separated W&B tags (default: $WANDB_TAGS).", "output")
    wandb_log_model: bool = _f(False, "Upload best/ to W&B as a model artifact at the end of training.", "output")
    logging_steps: int = _f(20, "Log training metrics every N optimizer steps.", "output")

    # ------------------------------------------------------------------ derived values
    @property
    def from_scratch(self) -> bool:
        return self.model_name_or_path is None and (self.config_name is not None or self.config_overrides is not None)

    @property
    def loader_workers(self) -> int:
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return 1 if self.streaming else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks
    def resolve_and_validate(self, light: bool = False) -> TrainConfig:
        """Fill derived defaults and check every value; raise UserError naming the problem and the fix.
        light: skip the checks that import torch (the schedule tried on a stand-in optimizer, fp16's GPU), for
        the early answer to a typo (answer_user_errors_first); the full parse that follows makes them."""
        if self.model_name_or_path is None and not self.from_scratch:
            self.model_name_or_path = DEFAULT_MODEL
        if self.train_file or self.dataset_dir:
            self.dataset_name = self.dataset_config_name = None
        elif self.dataset_name == DEFAULT_DATASET and self.dataset_config_name is None:
            self.dataset_config_name = DEFAULT_DATASET_CONFIG
        default_output = self.output_dir is None
        if default_output:
            self.output_dir = os.path.join(OUTPUTS_ROOT, default_run_name(self))
        _check_numbers(self)
        if not light:  # the checks that import torch
            _check_precision(self)
            _check_schedule(self)
        _check_sources(self)
        _check_model_paths(self)
        _check_output(
            self, "the default --output_dir (under the current directory)" if default_output else "--output_dir"
        )
        return self


def default_run_name(cfg: TrainConfig) -> str:
    model = cfg.model_name_or_path or cfg.config_name or "scratch"
    data = (
        cfg.dataset_config_name or cfg.dataset_name
        if cfg.dataset_name
        else os.path.basename(os.path.normpath(cfg.dataset_dir or (cfg.train_file or ["data"])[0]))
    )
    name = f"{os.path.basename(os.path.normpath(model))}-{data}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_numbers(c: TrainConfig) -> None:
    for f in dataclasses.fields(c):  # choices again: values from a --config file bypass argparse's check
        choices, v = f.metadata.get("choices"), getattr(c, f.name)
        _require(choices is None or v in choices, f"--{f.name} must be one of {', '.join(choices or ())}, got {v!r}")
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        _require(not isinstance(v, float) or math.isfinite(v), f"--{f.name} must be a finite number, got {v}")
    _require(c.max_nonfinite_steps >= 0, f"--max_nonfinite_steps must be 0 (off) or more, got {c.max_nonfinite_steps}")
    _require(c.stop_grace_seconds > 0, f"--stop_grace_seconds must be positive, got {c.stop_grace_seconds}")
    _require(c.ddp_timeout >= 10, f"--ddp_timeout must be at least 10 seconds, got {c.ddp_timeout}")
    if c.max_runtime is not None:
        runtime_seconds(c.max_runtime)  # a UserError naming the accepted forms
    _require(
        0.0 < c.mlm_probability < 1.0,
        f"--mlm_probability must be in (0, 1), got {c.mlm_probability}; 0.15 is the BERT recipe",
    )
    _require(
        c.eval_mlm_probability is None or 0.0 < c.eval_mlm_probability < 1.0,
        f"--eval_mlm_probability must be in (0, 1) (or left unset: --mlm_probability), got {c.eval_mlm_probability}",
    )
    for name in ("mask_replace_prob", "random_replace_prob"):
        v = getattr(c, name)
        _require(0.0 <= v <= 1.0, f"--{name} must be in [0, 1], got {v}")
    _require(
        c.mask_replace_prob + c.random_replace_prob <= 1.0 + 1e-9,
        f"--mask_replace_prob + --random_replace_prob must not exceed 1, got "
        f"{c.mask_replace_prob + c.random_replace_prob:g}; the rest of the selected tokens stay unchanged",
    )
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_total_limit",
    ):
        v = getattr(c, name)
        _require(v >= 1, f"--{name} must be at least 1, got {v}")
    for name in (
        "max_train_steps",
        "eval_steps",
        "save_steps",
        "max_train_samples",
        "max_eval_samples",
        "preprocessing_num_workers",
    ):
        v = getattr(c, name)
        _require(v is None or v >= 1, f"--{name} must be at least 1 (or left unset), got {v}")
    _require(c.max_seq_length >= 8, f"--max_seq_length must be at least 8, got {c.max_seq_length}")
    _require(c.learning_rate > 0, f"--learning_rate must be positive, got {c.learning_rate}")
    _require(c.weight_decay >= 0, f"--weight_decay must be non-negative, got {c.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(c, name)
        _require(0.0 <= v < 1.0, f"--{name} must be in [0, 1), got {v}")
    _require(c.adam_epsilon > 0, f"--adam_epsilon must be positive, got {c.adam_epsilon}")
    _require(c.max_grad_norm >= 0, f"--max_grad_norm must be non-negative (0 disables clipping), got {c.max_grad_norm}")
    _require(c.num_train_epochs > 0, f"--num_train_epochs must be positive, got {c.num_train_epochs}")
    _require(0.0 <= c.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
    _require(
        c.num_warmup_steps is None or c.num_warmup_steps >= 0,
        f"--num_warmup_steps must be non-negative, got {c.num_warmup_steps}",
    )
    _require(
        0 <= c.validation_split_percentage < 100,
        f"--validation_split_percentage must be in [0, 100), got {c.validation_split_percentage}",
    )
    _require(
        c.early_stopping_patience >= 0,
        f"--early_stopping_patience must be >= 0 (0 disables), got {c.early_stopping_patience}",
    )
    _require(
        c.early_stopping_min_delta >= 0, f"--early_stopping_min_delta must be >= 0, got {c.early_stopping_min_delta}"
    )
    _require(c.seed >= 0, f"--seed must be non-negative, got {c.seed}")
    _require(c.probe_folds >= 2, f"--probe_folds must be at least 2, got {c.probe_folds}")
    _require(
        c.max_probe_samples is None or c.max_probe_samples >= 2 * c.probe_folds,
        f"--max_probe_samples must be at least twice --probe_folds ({2 * c.probe_folds}), got {c.max_probe_samples}",
    )
    _require(
        c.torch_compile or c.torch_compile_mode == "default",
        f"--torch_compile_mode {c.torch_compile_mode} applies to --torch_compile; add --torch_compile",
    )
    _require(c.head_warmup_steps >= 0, f"--head_warmup_steps must be 0 (off) or more, got {c.head_warmup_steps}")
    for flag in ("add_tokens", "add_special_tokens"):
        if getattr(c, flag):
            token_list(flag, getattr(c, flag))  # a missing @FILE or an empty list is said now
    _require(
        c.metric_for_best_model != "probe" or bool(c.probe_file),
        "--metric_for_best_model probe needs --probe_file (your task's labelled texts); give one, or keep "
        "--metric_for_best_model perplexity",
    )
    _require(
        c.layerwise_lr_decay is None or 0.0 < c.layerwise_lr_decay <= 1.0,
        f"--layerwise_lr_decay must be in (0, 1] (1 = no decay), got {c.layerwise_lr_decay}; 0.8-0.95 is usual",
    )
    _require(
        0.0 <= c.label_smoothing < 1.0, f"--label_smoothing must be in [0, 1), got {c.label_smoothing}; 0.1 is usual"
    )
    _require(
        c.swa_start_step is None or c.swa_start_step >= 1,
        f"--swa_start_step must be at least 1 (or left unset), got {c.swa_start_step}",
    )
    _require(c.shuffle_buffer_size >= 1, f"--shuffle_buffer_size must be at least 1, got {c.shuffle_buffer_size}")
    _require(
        c.dataloader_num_workers is None or c.dataloader_num_workers >= 0,
        f"--dataloader_num_workers must be 0 or more, got {c.dataloader_num_workers}",
    )


def _check_precision(c: TrainConfig) -> None:
    if c.precision == "fp16":
        import torch  # imported here: validation of everything else needs no torch

        _require(
            torch.cuda.is_available(),
            "--precision fp16 needs a CUDA GPU (GradScaler); on CPU use --precision bf16 or fp32",
        )


def token_list(flag: str, value: Optional[str]) -> list[str]:
    """--add_tokens / --add_special_tokens: a comma list, or @FILE with one token per line (blank lines skipped)."""
    if not value:
        return []
    if value.startswith("@"):
        path = value[1:]
        _require(
            os.path.isfile(path), f"--{flag} {value!r}: {path!r} is not a file; give @FILE with one token per line"
        )
        with open(path, encoding="utf-8") as fh:
            tokens = [line.strip() for line in fh if line.strip()]
    else:
        tokens = [t.strip() for t in value.split(",") if t.strip()]
    _require(bool(tokens), f"--{flag} {value!r} names no token; give TOKEN,TOKEN or @FILE")
    return tokens


def scheduler_kwargs(c: TrainConfig) -> dict[str, Any]:
    """--lr_scheduler_kwargs as a dict (checked by _check_schedule)."""
    return json.loads(c.lr_scheduler_kwargs) if c.lr_scheduler_kwargs else {}


def _check_schedule(c: TrainConfig) -> None:
    """The schedule and its arguments, tried on a stand-in optimizer: a bad one is a line now, not a traceback
    after the data is prepared."""
    try:
        kwargs = scheduler_kwargs(c)
    except json.JSONDecodeError as e:
        raise UserError(
            f"--lr_scheduler_kwargs {c.lr_scheduler_kwargs!r} is not JSON ({e.msg}); give an object "
            "such as '{\"min_lr_rate\": 0.1}'"
        ) from None
    _require(isinstance(kwargs, dict), f"--lr_scheduler_kwargs must be a JSON object, got {c.lr_scheduler_kwargs!r}")
    import torch
    from transformers import get_scheduler

    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(
            c.lr_scheduler_type,
            stand_in,
            num_warmup_steps=2,
            num_training_steps=100,
            scheduler_specific_kwargs=schedule_defaults(c.lr_scheduler_type, kwargs, 100),
        ).lr_lambdas[0](50)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"--lr_scheduler_type {c.lr_scheduler_type} with --lr_scheduler_kwargs {c.lr_scheduler_kwargs or '{}'}: "
            f"{str(e).splitlines()[0]}; give the schedule's arguments as transformers names them"
        ) from None


def schedule_defaults(name: str, kwargs: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """The schedule's arguments with ours filled in: warmup_stable_decay decays over the last 10% of the steps
    unless num_decay_steps (or num_stable_steps) says otherwise."""
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        return {**kwargs, "num_decay_steps": max(1, round(0.1 * total_steps))}
    return kwargs


def _check_local_file(flag: str, path: str) -> None:
    _require(bool(path.strip()), f"--{flag} is empty; give the path of an existing text file")
    _require(
        not os.path.isdir(path),
        f"--{flag} {path!r} is a directory; give its files, or a glob such as '{os.path.join(path, '*.txt')}'",
    )
    _require(os.path.isfile(path), f"--{flag} {path!r} does not exist; give the path of an existing text file")
    _require(
        path.endswith(LOCAL_SUFFIXES),
        f"--{flag} {path!r} has an unsupported extension; use one of {', '.join(LOCAL_SUFFIXES)}",
    )
    _require(os.path.getsize(path) > 0, f"--{flag} {path!r} is empty; give a file that holds text")


def _expand_files(flag: str, given: Union[str, Sequence[str]]) -> list[str]:
    """The files of --train_file (or another split's option): each path or glob (sorted matches) in the order
    given, checked; the first that names nothing is the error. One split's files share one format."""
    files: list[str] = []
    for pattern in [given] if isinstance(given, str) else list(given):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        _require(
            bool(matches),
            f"--{flag} {pattern!r} matches no file; check the pattern (quote it so the shell does not expand it first)",
        )
        for path in matches:
            _check_local_file(flag, path)
            files.append(path)
    kinds = sorted({builder_for(p) for p in files})
    _require(len(kinds) == 1, f"--{flag} mixes formats ({', '.join(kinds)}); give the files of one split in one format")
    return files


def _check_sources(c: TrainConfig) -> None:
    _require(not (c.train_file and c.dataset_dir), "give either --train_file or --dataset_dir, not both")
    _require(
        not (c.validation_file and not c.train_file),
        "--validation_file needs --train_file; with --dataset_dir the validation file is wiki.valid.raw",
    )
    if c.dataset_dir is not None:
        d, fix = c.dataset_dir, "give the folder holding wiki.train.raw and wiki.valid.raw"
        _existing_dir("--dataset_dir", d, fix)
        for name in WIKITEXT_FILES.values():
            _require(os.path.isfile(os.path.join(d, name)), f"--dataset_dir {d!r} holds no {name}; {fix}")
            _check_local_file("dataset_dir", os.path.join(d, name))
    for flag in ("train_file", "validation_file", "test_file", "probe_file"):
        if getattr(c, flag):
            setattr(c, flag, _expand_files(flag, getattr(c, flag)))
    # A separator typed on a shell arrives as backslash-n: read the usual escapes as what they name.
    c.text_separator = c.text_separator.replace("\\n", "\n").replace("\\t", "\t")
    if c.text_column is not None:
        _require(
            all(n.strip() for n in c.text_column.split(",")),
            f"--text_column {c.text_column!r} names an empty column; give NAME or NAME,NAME",
        )
    _require(
        bool(c.dataset_name or c.train_file or c.dataset_dir),
        "no training data: give --dataset_name, --train_file or --dataset_dir",
    )
    if c.streaming:
        _require(
            c.max_train_steps is not None,
            "--streaming needs --max_train_steps: a stream has no known length, so the schedule is set by steps",
        )
        _require(
            not c.line_by_line,
            "--line_by_line does not apply to --streaming, which packs texts into chunks; drop one of them",
        )
        _require(
            c.max_train_samples is None,
            "--max_train_samples does not apply to --streaming; bound training with --max_train_steps",
        )
        _require(
            not (c.train_file and not c.validation_file),
            "--streaming with --train_file needs "
            "--validation_file: the validation set is read whole, so it cannot be carved from a stream",
        )


def _check_model_paths(c: TrainConfig) -> None:
    for flag in ("model_name_or_path", "config_name", "tokenizer_name"):
        name = getattr(c, flag)
        if name is None:
            continue
        _require(
            bool(name.strip()),
            f"--{flag} is empty; give a Hub id (e.g. bert-base-uncased) or a directory written by save_pretrained",
        )
        if os.path.isdir(name):
            _require(
                os.path.isfile(os.path.join(name, "config.json")) or flag == "tokenizer_name",
                f"--{flag} {name!r} is a directory with no config.json, so it holds no model; give a Hub id "
                "(e.g. bert-base-uncased) or a directory written by save_pretrained",
            )
            if flag == "tokenizer_name" or flag == "model_name_or_path":
                has_tok = has_tokenizer_files(name)
                _require(
                    has_tok or flag == "model_name_or_path" and c.tokenizer_name is not None,
                    f"--{flag} {name!r} holds no tokenizer files; "
                    + (
                        "give a Hub id or a directory written by tokenizer.save_pretrained"
                        if flag == "tokenizer_name"
                        else "add them with tokenizer.save_pretrained or pass --tokenizer_name"
                    ),
                )
        elif os.path.isfile(name):
            _require(
                flag == "config_name" and name.endswith(".json"),
                f"--{flag} {name!r} is a file; give a Hub id or a directory written by save_pretrained",
            )
        else:
            _require(
                not looks_like_path(name), f"--{flag} {name!r} does not exist; give a Hub id or an existing directory"
            )
    _require(
        not (c.from_scratch and c.tokenizer_name is None and c.config_name is None),
        "--config_overrides alone has no tokenizer; pass --tokenizer_name (and --config_name to start from a "
        "known architecture)",
    )
    config_dir = c.config_name if c.config_name and os.path.isdir(c.config_name) else None
    _require(
        not (c.from_scratch and c.tokenizer_name is None and config_dir and not has_tokenizer_files(config_dir)),
        f"--config_name {c.config_name!r} holds a config but no tokenizer, and a model built from scratch takes "
        "its tokenizer from there; pass --tokenizer_name (a Hub id or a directory with tokenizer files)",
    )


def _existing_dir(what: str, path: str, fix: str) -> None:
    """A directory a run reads (what names its option): one line when it is empty, a file, or missing."""
    _require(bool(path.strip()), f"{what} is empty; {fix}")
    _require(not os.path.isfile(path), f"{what} {path!r} is a file; {fix}")
    _require(os.path.isdir(path), f"{what} {path!r} does not exist; {fix}")


def _writable_dir(what: str, path: str, fix: str) -> str:
    """A directory a run writes (what names it: an option, or a default): one line when it is empty, a file, or
    cannot be created or written; the nearest existing directory (for the free-space check)."""
    _require(bool(path.strip()), f"{what} is empty; {fix}")
    _require(not os.path.isfile(path), f"{what} {path!r} is a file, not a directory; {fix}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _require(
        not os.path.isfile(existing),
        f"{what} {path!r} cannot be made: {existing!r} is a file, not a directory; {fix}",
    )
    _require(
        os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK),
        f"{what} {path!r} cannot be written: {existing!r} is not a writable directory (a read-only mount, or "
        f"another user's); {fix}",
    )
    return existing


def _check_output(c: TrainConfig, what: str = "--output_dir") -> None:
    """what: how the output directory is named in a line (the option, or the default it fell back to)."""
    out = c.output_dir
    existing = _writable_dir(what, out, "choose another --output_dir")
    cache_fix = "point --data_cache_dir at a directory you can write (its disk holds the tokenised data)"
    if c.data_cache_dir is not None:
        _writable_dir("--data_cache_dir", c.data_cache_dir, cache_fix)
    else:
        _writable_dir("the default data cache (from $XDG_CACHE_HOME or ~/.cache)", default_cache_dir(), cache_fix)
    _require(
        shutil.disk_usage(existing).free > 64 * 2**20,
        f"--output_dir {out!r}: less than 64 MiB free on its disk; free space or choose another --output_dir",
    )
    r = c.resume_from_checkpoint
    if r not in (None, "auto", "none"):
        fix = "give a checkpoints/step-N folder, 'auto' or 'none'"
        _existing_dir("--resume_from_checkpoint", r, fix)
        exported = os.path.isfile(os.path.join(r, "config.json")) and not os.path.isfile(
            os.path.join(r, "trainer_state.json")
        )
        _require(
            not exported,
            f"--resume_from_checkpoint {r!r} is an exported model (best/ or save_pretrained), not a resumable "
            "checkpoint; resume from a checkpoints/step-N folder or 'auto', or start a new run from it with "
            f"--model_name_or_path {r}",
        )
        _require(
            os.path.isfile(os.path.join(r, "trainer_state.json")),
            f"--resume_from_checkpoint {r!r} is not a checkpoint (it holds no trainer_state.json); {fix}",
        )
    if c.overwrite_output_dir:
        _check_overwrite_spares_inputs(c)


def _check_overwrite_spares_inputs(c: TrainConfig) -> None:
    """--overwrite_output_dir deletes what a run wrote in output_dir: refuse, before anything is deleted, when a
    path this run reads is among it (fine-tuning further from OUT/best into OUT, say)."""
    reads = {
        flag: [getattr(c, flag)]
        for flag in ("model_name_or_path", "config_name", "tokenizer_name", "dataset_dir", "resume_from_checkpoint")
    }
    files = ("train_file", "validation_file", "test_file", "probe_file")
    reads.update({flag: list(getattr(c, flag) or ()) for flag in files})
    reads = {flag: [p for p in paths if p and os.path.exists(p)] for flag, paths in reads.items()}
    overlap = input_in_run_dir(c.output_dir, reads)
    if overlap:
        flag, path = overlap
        raise UserError(
            f"--{flag} {path!r} is inside --output_dir {c.output_dir!r}, where --overwrite_output_dir "
            "deletes what a run wrote (checkpoints/, best/, the history); copy it out of there and "
            f"point --{flag} at the copy, or choose another --output_dir"
        )


# ---------------------------------------------------------------------- command line
def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _argparse_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """HfArgumentParser hands a field's metadata to add_argument: all of it but the group."""
    return {k: v for k, v in f.metadata.items() if k != "group"}


def _section(group: str, title: str) -> type:
    """The fields of one group as a dataclass of their own: HfArgumentParser lists each such dataclass under its
    `_argument_group_name` in --help. Parsing still fills one namespace, read into one TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    fields = [
        (f.name, hints[f.name], field(default=f.default, metadata=_argparse_kwargs(f)))
        for f in dataclasses.fields(TrainConfig)
        if f.metadata["group"] == group
    ]
    return dataclasses.make_dataclass(f"{group.title()}Options", fields, namespace={"_argument_group_name": title})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default said once and as it is: not added where the help already says it, a string shown as Python
    writes it (a newline separator as '\\n'), and a --no_ switch described as what it turns off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        negation = next((o for o in action.option_strings if o.startswith("--no_")), None)
        if negation:
            return f"Turn --{negation[len('--no_') :]} off."
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        default = repr(action.default) if isinstance(action.default, str) else action.default
        return f"{text} (default: {str(default).replace('%', '%%')})"


# The Hugging Face Trainer's names for our options, accepted as they are typed there: alias -> (option, how the
# alias's value becomes the option's). --warmup_steps is a count, or below 1 a ratio of the total steps, as
# transformers 5 reads it.
TRAINER_ALIASES: dict[str, tuple[str, str]] = {
    "max_steps": ("max_train_steps", "Steps to train: --max_train_steps."),
    "warmup_steps": ("num_warmup_steps", "Warmup: a count (--num_warmup_steps), or below 1 a ratio (--warmup_ratio)."),
    "fp16": ("precision", "--precision fp16."),
    "bf16": ("precision", "--precision bf16."),
}


def _alias_values(given: dict[str, Any]) -> dict[str, Any]:
    """Our options' values from the Trainer's names given (alias -> value)."""
    out: dict[str, Any] = {}
    for alias, value in given.items():
        if value is None or value is False:
            continue
        if alias == "warmup_steps":
            number = float(value)
            _require(number >= 0, f"--warmup_steps must be non-negative, got {value}")
            out.update({"warmup_ratio": number} if number < 1 else {"num_warmup_steps": int(number)})
        elif alias in ("fp16", "bf16"):
            _require(out.get("precision", alias) == alias, "--fp16 and --bf16 both given; choose one (or --precision)")
            out["precision"] = alias
        else:
            out[TRAINER_ALIASES[alias][0]] = value
    return out


def _merge_aliases(values: dict[str, Any], aliases: dict[str, Any], named: set[str]) -> None:
    """Apply the aliases' values; an option given under both names with different values is an error."""
    typed = {a: v for a, v in aliases.items() if v is not None and v is not False}
    if "warmup_steps" in typed:  # one warmup, however it is given
        other = next((o for o in ("num_warmup_steps", "warmup_ratio") if o in named), None)
        _require(
            other is None or _alias_values({"warmup_steps": typed["warmup_steps"]}).get(other) == values[other],
            f"--warmup_steps (the Trainer's name) and --{other} both set the warmup; give one of them",
        )
    for option, value in _alias_values(typed).items():
        alias = next(a for a in typed if option in (TRAINER_ALIASES[a][0], "warmup_ratio"))
        if option in named and values[option] != value:
            raise UserError(
                f"--{alias} (the Trainer's name) gives {option} {value!r}, but --{option} {values[option]!r} is "
                "given too; give one of them"
            )
        values[option] = value


def build_parser(prog: str = "train_ddp.py") -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    class Parser(OneLineErrors, HfArgumentParser):
        pass

    p = Parser(
        [_section(group, title) for group, title in GROUPS.items()],
        prog=prog,
        formatter_class=_HelpFormatter,
        description="Masked-LM fine-tuning of BERT-style models on PyTorch DDP. "
        "Launch with torchrun --nproc_per_node=N train_ddp.py [options], or bash launch.sh [options].",
    )
    p.add_argument("--config", default=None, help="YAML or JSON file of options; the command line overrides it.")
    names = p.add_argument_group("the Hugging Face Trainer's names (aliases)")
    for alias, (_, text) in TRAINER_ALIASES.items():
        if alias in ("fp16", "bf16"):
            names.add_argument(f"--{alias}", dest=f"alias_{alias}", type=_str2bool, nargs="?", const=True, help=text)
        else:
            names.add_argument(
                f"--{alias}", dest=f"alias_{alias}", type=int if alias == "max_steps" else float, help=text
            )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if _base_type(hints[f.name]) is bool and f.default is False:  # HfArgumentParser adds --no_ for True only
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
    return p


def load_config_file(path: str) -> dict[str, Any]:
    fix = "give a YAML or JSON file of options (see configs/)"
    _require(bool(path.strip()), f"--config is empty; {fix}")
    _require(not os.path.isdir(path), f"--config {path!r} is a directory; {fix}")
    _require(os.path.isfile(path), f"--config {path!r} does not exist; {fix}")
    _require(os.path.getsize(path) > 0, f"--config {path!r} is empty; {fix}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # any parse error is the user's file, not our bug
        raise UserError(
            f"--config {path!r} could not be parsed ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); fix the file's syntax"
        ) from None
    data = data or {}
    _require(isinstance(data, dict), f"--config {path!r} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(TRAINER_ALIASES)
    unknown = sorted(set(data) - known)
    _require(
        not unknown, f"--config {path!r} has unknown option(s) {', '.join(unknown)}; see `python train_ddp.py --help`"
    )
    return data


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def runtime_seconds(value: str) -> float:
    """--max_runtime in seconds: 11h30m, 90m, 45s, 1h, or a plain number of seconds."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.match(text)
        seconds = (
            sum(float(g) * unit for g, unit in zip(match.groups(), (3600, 60, 1)) if g) if match and text else -1.0
        )
    if not seconds > 0:
        raise UserError(f"--max_runtime {value!r}: give a positive duration such as 11h30m, 90m, 45s or 3600 (seconds)")
    return seconds


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "train_ddp.py") -> TrainConfig:
    """Parse the command line (and --config file) into a validated TrainConfig."""
    return parse_command_line(argv, prog)[0]


def parse_command_line(
    argv: Optional[Sequence[str]] = None, prog: str = "train_ddp.py", light: bool = False
) -> tuple[TrainConfig, frozenset[str]]:
    """The validated TrainConfig, and which options the user gave (command line or --config file) as opposed to
    defaults: a resume keeps the checkpoint's global batch by deriving the accumulation, unless the user set it.
    light: every check but those that import torch (TrainConfig.resolve_and_validate)."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    file_values = load_config_file(pre.config) if pre.config is not None else {}
    # Values from the file pass through the same type conversion as the command line.
    parser.set_defaults(**{k: _coerce(k, v) for k, v in file_values.items() if k not in TRAINER_ALIASES})
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    named = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    named |= set(file_values)
    aliases = {a: getattr(ns, f"alias_{a}") for a in TRAINER_ALIASES}
    aliases.update({a: v for a, v in file_values.items() if a in TRAINER_ALIASES})
    _merge_aliases(values, aliases, named)
    cfg = TrainConfig(**values).resolve_and_validate(light)
    named |= {option for option in _alias_values({a: v for a, v in aliases.items() if v}).keys()}
    return cfg, frozenset(named)


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(v)


def _coerce(name: str, value: Any) -> Any:
    tp = _base_type(typing.get_type_hints(TrainConfig)[name])
    if value is None:
        return None
    try:
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(str(value))
        if typing.get_origin(tp) is list:  # a path list: one path or several
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp is str and isinstance(value, dict):  # a JSON option (--lr_scheduler_kwargs) written as a mapping
            return json.dumps(value)
        return tp(value)
    except (ValueError, TypeError):
        raise UserError(f"option {name} in the config file: {value!r} is not a valid {tp.__name__}") from None


def answer_user_errors_first(argv: Sequence[str]) -> None:
    """For train_ddp.py before its imports (torch, then transformers, seconds on every rank): exit with the user
    error's line and code when the options or the paths they name are wrong, or when a restarted attempt follows
    one; return when the run can start. --help exits here too. The checks that need torch are left to main's
    full parse, after the imports."""
    if stopped_on_a_user_error():
        sys.exit(EXIT_USER_ERROR)
    try:
        parse_command_line(list(argv), light=True)
    except UserError as e:
        sys.exit(report_user_error(e, env_rank()))


@command_line
def check_main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m mlm.config [options]: check options without starting (launch.sh and the SLURM script do)."""
    parse_args(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
