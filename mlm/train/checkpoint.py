"""Resumable checkpoints: TrainState, atomic `checkpoints/step-N/` directories, choosing one to resume.

A checkpoint holds every piece of state needed to continue exactly: the weights (safetensors) and, for each
named piece, the `state_dict()` of an object with `state_dict`/`load_state_dict` (optimizer, schedule, scaler,
every rank's RNG states, SWA). It is written into a temporary directory, flushed and renamed into place
(invariant 5, docs/DESIGN.md); its manifest (file sizes and SHA-256) is written last, so a checkpoint without a
valid manifest is incomplete. The plain Hugging Face export (best/) is mlm/train/export.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import torch

from mlm.common.cli import UserError
from mlm.common.files import clear_run_dir, free_bytes, replace_dir, sha256_file, write_json_atomic
from mlm.train.optim import steps_left_at

log = logging.getLogger("mlm")
_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed (per rank), after epoch_offset
    epoch_offset: int = 0  # examples of this epoch trained with an earlier global batch (0 normally)
    best_metric: Optional[float] = None  # the best --metric_for_best_model figure (perplexity by default)
    best_step: Optional[int] = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    stopped_early: bool = False
    world_size: int = 1
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 0  # 0 in checkpoints written before it was recorded
    precision: str = ""
    tracker_run_id: Optional[str] = None
    train_seconds: float = 0.0  # wall time in the training loop, over every attempt (the model card's)
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, v)


# ---------------------------------------------------------------------- files, atomically
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


def _write_manifest(path: str) -> None:
    files = {
        n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": sha256_file(os.path.join(path, n))}
        for n in sorted(os.listdir(path))
        if n != MANIFEST
    }
    write_json_atomic(os.path.join(path, MANIFEST), {"files": files})


def is_complete(path: str, verify_hashes: bool = False) -> bool:
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            files = json.load(fh)["files"]
        for name, info in files.items():
            p = os.path.join(path, name)
            if os.path.getsize(p) != info["bytes"] or (verify_hashes and sha256_file(p) != info["sha256"]):
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class RankRngs:
    """Every rank's RNG states as a checkpoint piece: gathered on rank 0 to be saved; on load, this rank's own
    (so dropout continues exactly where it was). A checkpoint of another world size has no state that belongs
    to this rank: then every rank's generators are seeded from (seed, step, rank) instead, which is as good a
    dropout stream, but not the one the uninterrupted run would have drawn."""

    rank: int
    gathered: Optional[list[dict[str, Any]]] = None
    world_size: int = 1
    seed: int = 0
    step: int = 0  # the checkpoint's step, set by load_checkpoint before this piece is loaded

    def state_dict(self) -> Optional[list[dict[str, Any]]]:
        return self.gathered

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
            return
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{self.step}:{self.rank}".encode()).digest()[:4], "little")
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # CUDA's generators too


# ---------------------------------------------------------------------- resumable checkpoints
def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return sorted(found)


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    for _, path in reversed(checkpoint_dirs(output_dir)):
        if is_complete(path, verify_hashes=True):
            return path
        log.warning(
            f"warning: skipping checkpoint {path}: incomplete or damaged (its {MANIFEST} is missing or a "
            "file's size or SHA-256 differs); trying an older one"
        )
    return None


def recover_interrupted_saves(output_dir: str) -> None:
    """Rank 0, before choosing a checkpoint: clean up after a process that died while saving.

    A save writes `.tmp-step-N` (or `best.tmp`) and renames it into place; replacing an existing directory
    first moves the old one to `<name>.old`. A crash leaves one of these behind: the unfinished copy is removed,
    and an old copy whose replacement never arrived is put back."""
    candidates = [os.path.join(output_dir, "best")]
    root = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(".tmp-step-"):
                log.warning(f"warning: removing {path}: an unfinished save (the process stopped while writing it)")
                shutil.rmtree(path, ignore_errors=True)
            elif name.endswith(".old"):
                candidates.append(path[: -len(".old")])
    for final in candidates:
        tmp, old = f"{final}.tmp", f"{final}.old"
        if os.path.isdir(tmp):
            log.warning(f"warning: removing {tmp}: an unfinished save (the process stopped while writing it)")
            shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old):
            if os.path.exists(final):
                shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning(f"warning: restoring {final} from {old}: a save stopped between its two renames")
                os.rename(old, final)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint and one best/ export take: fp32 weights, AdamW's two moments, the export."""
    params = sum(p.numel() for p in model.parameters())
    return params * 4 * 4


def check_free_space(output_dir: str, model: torch.nn.Module) -> None:
    """Rank 0, before training: room for one more checkpoint (the older ones are removed only after it)."""
    need = checkpoint_bytes(model)
    free = free_bytes(output_dir)
    if free < need * 1.2:
        raise UserError(
            f"--output_dir {output_dir!r}: {free / 2**30:.2f} GiB free on its disk, but one checkpoint "
            f"of this model needs about {need / 2**30:.2f} GiB; free space, lower --save_total_limit, or "
            "choose another --output_dir"
        )


def save_checkpoint(
    output_dir: str,
    state: TrainState,
    model: torch.nn.Module,
    parts: Mapping[str, Stateful],
    save_total_limit: int,
    tokenizer=None,
) -> str:
    """Rank 0 only: the weights, `<name>.pt` for each piece (None pieces skipped), the tokenizer's files (the
    tokens a run added are part of what it trains), the state, the manifest."""
    from safetensors.torch import save_model

    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{state.step}")
    tmp = os.path.join(root, f".tmp-step-{state.step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model(model, os.path.join(tmp, "model.safetensors"))  # handles the tied embedding/decoder weights
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, piece in parts.items():
            if piece is not None:
                torch.save(piece.state_dict(), os.path.join(tmp, f"{name}.pt"))
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), state.state_dict())
        _write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: no half-written checkpoint is left behind
        raise
    replace_dir(tmp, final)
    for _, old in checkpoint_dirs(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_state(path: str) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    with open(os.path.join(path, "trainer_state.json")) as fh:
        return json.load(fh)


def global_batch(saved: dict[str, Any], accumulation: int) -> int:
    """The global batch a checkpoint was trained with (accumulation: assumed where the checkpoint predates
    recording it)."""
    return (
        saved["world_size"]
        * saved["per_device_train_batch_size"]
        * (saved.get("gradient_accumulation_steps") or accumulation)
    )


def adapt_to_checkpoint(
    saved: dict[str, Any], world_size: int, per_device: int, accumulation: Optional[int], precision: str
) -> tuple[int, list[str]]:
    """The accumulation that keeps a checkpoint's global batch on this run's processes and per-device batch,
    and what changed, said for the banner; a UserError naming values that would keep it, when none does.

    Same global batch, any world size: every optimizer step after the resume trains on the examples (and
    masks) of the run that never stopped (GlobalOrderSampler lays a step's examples out by global position)."""
    given = accumulation is not None  # the user set --gradient_accumulation_steps: it is not derived
    g = global_batch(saved, accumulation or 1)
    w0, b0 = saved["world_size"], saved["per_device_train_batch_size"]
    a0 = saved.get("gradient_accumulation_steps") or accumulation or 1
    notes = []
    if given and per_device * world_size * accumulation != g:
        new_g = per_device * world_size * accumulation
        schedule = saved.get("extra", {}).get("schedule")
        left = (
            f"; the learning-rate schedule continues by examples seen: {steps_left(saved, new_g)} more steps of {new_g}"
            if schedule
            else ""
        )
        notes.append(
            f"global batch {g} ({w0} x {b0} x {a0}) -> {new_g} ({world_size} x {per_device} x {accumulation}, "
            f"--gradient_accumulation_steps given): the epoch continues from its first example not yet "
            f"trained on, none twice, none skipped{left}"
        )
        return accumulation, notes
    if g % (per_device * world_size) == 0:
        new = g // (per_device * world_size)
        if (w0, b0, a0) != (world_size, per_device, new):
            notes.append(
                f"{w0} x {b0} x {a0} (processes x per device x accumulation) -> {world_size} x {per_device} "
                f"x {new}: global batch {g} kept, so each step trains on the examples it would have"
                + ("; accumulation derived from the checkpoint" if not given and new != a0 else "")
            )
        if w0 != world_size:
            notes.append(
                f"dropout generators seeded from (seed, step, rank): {w0} ranks' states do not map onto {world_size}"
            )
        saved_precision = saved.get("precision") or ""
        if saved_precision and saved_precision != precision:
            scaler = (
                "the fp16 loss scale starts fresh"
                if precision == "fp16"
                else "the fp16 GradScaler's state is dropped"
                if saved_precision == "fp16"
                else "no scaler either way"
            )
            notes.append(
                f"precision {saved_precision} -> {precision}: fp32 master weights and optimizer state "
                f"carry over; {scaler}"
            )
        return new, notes
    options = [(b, g // (b * world_size)) for b in range(1, g + 1) if g % (b * world_size) == 0]
    if not options:
        raise UserError(
            f"the checkpoint's global batch {g} ({w0} processes x {b0} per device x {a0} accumulation) "
            f"cannot be split over {world_size} processes: resume on a number of processes that divides "
            f"{g}, or start afresh with --overwrite_output_dir"
        )
    b, a = min(options, key=lambda o: (abs(o[0] - per_device), -o[0]))  # the nearest; the larger of two
    raise UserError(
        f"the checkpoint's global batch {g} ({w0} processes x {b0} per device x {a0} accumulation) "
        f"cannot be made with --per_device_train_batch_size {per_device} on {world_size} processes: "
        f"pass --per_device_train_batch_size {b} --gradient_accumulation_steps {a} to keep it"
    )


def steps_left(saved: dict[str, Any], batch: int) -> Optional[int]:
    """Optimizer steps of `batch` examples that finish a checkpoint's schedule (None before schedules were
    recorded in trainer_state.json)."""
    schedule = saved.get("extra", {}).get("schedule")
    return steps_left_at(schedule, batch) if schedule else None


def load_checkpoint(
    path: str, state: TrainState, model: torch.nn.Module, parts: Mapping[str, Stateful], device: torch.device
) -> None:
    """Every rank: the weights onto device, then each piece whose file the checkpoint has (a piece saved only
    from some step on, like SWA's average, is absent from earlier checkpoints)."""
    from safetensors.torch import load_model

    if not is_complete(path):
        raise UserError(
            f"checkpoint {path!r} is incomplete or damaged (no valid {MANIFEST}); pass another "
            "--resume_from_checkpoint or 'auto'"
        )
    saved = saved_state(path)
    now = (state.world_size, state.per_device_train_batch_size, state.gradient_accumulation_steps, state.precision)
    state.load_state_dict(saved)
    # This run's layout; the position in the epoch in its micro-batches (the same examples: the global batch
    # is the same, and a checkpoint is written at a step boundary).
    examples = (
        saved.get("epoch_offset", 0)
        + saved["micro_in_epoch"] * saved["per_device_train_batch_size"] * saved["world_size"]
    )
    (state.world_size, state.per_device_train_batch_size, state.gradient_accumulation_steps, state.precision) = now
    per_micro = state.per_device_train_batch_size * state.world_size
    if examples % per_micro == 0 and not saved.get("epoch_offset"):  # the same layout grid: exactly as before
        state.epoch_offset, state.micro_in_epoch = 0, examples // per_micro
    else:  # another global batch: this run's layout starts at the first example not yet trained
        state.epoch_offset, state.micro_in_epoch = examples, 0
    for piece in parts.values():
        if isinstance(piece, RankRngs):
            piece.step = state.step
    load_model(model, os.path.join(path, "model.safetensors"), device=str(device))
    for name, piece in parts.items():
        file = os.path.join(path, f"{name}.pt")
        if piece is not None and os.path.isfile(file):
            # On the CPU: RNG states must be CPU tensors; optimizers and modules move the rest themselves.
            piece.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))


# ---------------------------------------------------------------------- the run directory


def choose_resume(output_dir: str, resume_from_checkpoint: Optional[str], overwrite: bool) -> Optional[str]:
    """Rank 0: which checkpoint to resume from, after clearing the run directory when asked to.

    Default (None) and 'auto' resume from the newest complete checkpoint when there is one; overwrite starts
    afresh and deletes only what a run writes, by name (files.run_written_paths); the config has refused a run
    that reads a path among them.
    """
    recover_interrupted_saves(output_dir)
    if overwrite:
        clear_run_dir(output_dir)
    if resume_from_checkpoint not in (None, "auto", "none"):
        return resume_from_checkpoint
    found = checkpoint_dirs(output_dir)
    if resume_from_checkpoint == "none" and found:
        raise UserError(
            f"{output_dir!r} holds checkpoints of an earlier run; resume it (the default), or pass "
            "--overwrite_output_dir to start afresh"
        )
    return latest_complete_checkpoint(output_dir) if found and resume_from_checkpoint != "none" else None


# ---------------------------------------------------------------------- what a resume must find unchanged
# The config keys that give a model its shape: weights saved with one do not load into another.
_SHAPE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "embedding_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def resume_identity(cfg, model_config, tokenizer, eval_dataset, best_by: str = "perplexity") -> dict[str, str]:
    """What a checkpoint is only comparable under, in words: a resume that changes one of these would load
    weights into another model, or compare perplexities measured on other data or other masks (best/ and early
    stopping). Rank 0, once per run; saved with each checkpoint."""
    shape = {k: getattr(model_config, k) for k in _SHAPE_KEYS if getattr(model_config, k, None) is not None}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    examples = hashlib.sha256()
    for start in range(0, len(eval_dataset), 1024):
        batch = eval_dataset.__getitems__(list(range(start, min(start + 1024, len(eval_dataset)))))
        examples.update(batch["input_ids"].numpy().tobytes())
    return {
        # The tokenizer first: added tokens change the vocabulary size too, and the tokens are the cause.
        "tokenizer": f"{type(tokenizer).__name__} of {len(tokenizer)} tokens (vocabulary {_digest(vocab)})",
        "model architecture": ", ".join(f"{k} {v}" for k, v in shape.items()),
        "--max_seq_length": str(cfg.max_seq_length),
        "evaluation data": f"{len(eval_dataset)} examples (content {examples.hexdigest()[:12]})",
        # The rate the evaluation masks are drawn at (--eval_mlm_probability, else --mlm_probability), written as
        # checkpoints before --eval_mlm_probability wrote it, so theirs compare equal.
        "evaluation masking": f"--mlm_probability {cfg.eval_mlm_probability or cfg.mlm_probability}"
        f", --mask_replace_prob {cfg.mask_replace_prob}, --random_replace_prob {cfg.random_replace_prob}, "
        f"--whole_word_mask {cfg.whole_word_mask}, --seed {cfg.seed}",
        "figure that picks best/": best_by,
    }


def check_comparable(resume: str, identity: dict[str, str]) -> None:
    """Rank 0, before any weight is loaded: a UserError naming the first thing that differs from the
    checkpoint's run, with its old and new value and the two ways out. A checkpoint written before this was
    recorded is taken as it is."""
    saved = saved_state(resume).get("extra", {}).get("comparable") or {}
    for what, now in identity.items():
        before = saved.get(what)
        if before is not None and before != now:
            raise UserError(
                f"cannot resume {resume}: its {what} was {before}, this run's is {now}; resume with the "
                "checkpoint's settings, or start a new run with another --output_dir"
            )
