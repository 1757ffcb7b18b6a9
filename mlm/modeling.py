"""Model and tokenizer construction, the masked-only MLM loss, optimizer groups and the LR schedule."""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig, UserError
from .masking import IGNORE_INDEX

log = logging.getLogger("mlm")
# Models whose position table keeps padding_idx + 1 rows in front of the first real position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer"}


def load_error(what: str, name: str, e: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = "offline and not in the local cache" if offline and not os.path.isdir(name) else \
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return UserError(f"could not load the {what} {name!r} ({why}); give a Hub id you can reach or a directory "
                     "written by save_pretrained")


def load_model_config(cfg: TrainConfig):
    """The architecture config: of the pretrained model, or of --config_name (+ --config_overrides)."""
    from transformers import AutoConfig, BertConfig
    name = cfg.model_name_or_path or cfg.config_name
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code) if name else BertConfig()
    except Exception as e:
        raise load_error("model config", name, e) from None
    if cfg.from_scratch and cfg.config_overrides:
        try:
            config.update_from_string(cfg.config_overrides)
        except ValueError as e:
            raise UserError(f"--config_overrides {cfg.config_overrides!r}: {e}; use 'key=value,key=value' with "
                            "keys of the model config") from None
    return config


def usable_positions(config) -> int:
    offset = config.pad_token_id + 1 if config.model_type in _OFFSET_POSITIONS else 0
    return int(getattr(config, "max_position_embeddings", 10**9)) - offset


def check_model_config(cfg: TrainConfig, config) -> None:
    limit = usable_positions(config)
    if cfg.max_seq_length > limit:
        raise UserError(f"--max_seq_length {cfg.max_seq_length} exceeds the model's {limit} position embeddings; "
                        f"use --max_seq_length {limit} or less")
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        log.info("bf16 on CPU: autocast runs matmuls in bf16, which is slow on CPUs without AMX")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer
    name = cfg.tokenizer_name or cfg.model_name_or_path or cfg.config_name
    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise load_error("tokenizer", name, e) from None
    if tok.mask_token_id is None:
        raise UserError(f"the tokenizer {name!r} has no mask token, so it cannot train a masked LM")
    return tok


def build_model(cfg: TrainConfig, config, tokenizer) -> nn.Module:
    """AutoModelForMaskedLM, pretrained or from scratch, with the configured attention kernel.

    The master weights are fp32 whatever dtype the checkpoint's config records: transformers 5 loads a model in
    that dtype by default, so an fp16-saved model would give fp16 parameters (GradScaler cannot unscale them)
    and a bf16 one pure-bf16 training. Autocast supplies the low precision."""
    from transformers import AutoModelForMaskedLM
    torch.manual_seed(cfg.seed)  # the same fresh weights (head, or whole model) on every rank
    if cfg.from_scratch:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        model = AutoModelForMaskedLM.from_config(config, attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    else:
        try:
            model = AutoModelForMaskedLM.from_pretrained(cfg.model_name_or_path, config=config,
                                                         attn_implementation=cfg.attn_implementation,
                                                         trust_remote_code=cfg.trust_remote_code,
                                                         dtype=torch.float32)
        except Exception as e:
            raise load_error("model", cfg.model_name_or_path, e) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.get_input_embeddings().num_embeddings} embeddings; use the model's own tokenizer")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def split_encoder_head(model: nn.Module) -> tuple[nn.Module, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """The encoder, and the prediction head as a function of hidden states, for the families we know.

    With the head separate, vocabulary logits are computed only at masked positions (~15% of tokens).
    Unknown families return no head and take the (slower) full-logits path.
    """
    if hasattr(model, "cls") and hasattr(model, "bert"):           # BERT, and MiniLM/ BERT-likes
        return model.bert, model.cls
    if hasattr(model, "lm_head") and hasattr(model, "base_model"):  # RoBERTa, XLM-R, CamemBERT
        return model.base_model, model.lm_head
    if hasattr(model, "vocab_projector") and hasattr(model, "distilbert"):  # DistilBERT
        def head(h: torch.Tensor) -> torch.Tensor:
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
        return model.distilbert, head
    return model, None


def head_logits(encoder: nn.Module, head: Optional[Callable[[torch.Tensor], torch.Tensor]], model: nn.Module,
                input_ids: torch.Tensor, positions: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Vocabulary logits at the flat positions (row * length + column) of input_ids ([M, V]).

    The positions are known on the host (training: from the masks; prediction: from the input ids), so the
    gather is an index_select on the device with no host sync; the head runs on those M rows only."""
    if head is not None:
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return head(hidden.flatten(0, 1).index_select(0, positions))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.flatten(0, 1).index_select(0, positions)


class MaskedLMLoss(nn.Module):
    """Wraps a masked LM so DDP sees one module whose forward returns the NLL summed over the masked
    positions only. The caller normalises by the global masked-token count (invariant 2)."""

    def __init__(self, model: nn.Module, compile_encoder: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing  # training loss only; eval_nll never smooths
        self.encoder, self.head = split_encoder_head(model)
        self.eval_encoder = self.encoder
        if compile_encoder and self.head is not None:
            # Training feeds the encoder one fixed [batch, length] shape (the loader fills the last batch of an
            # epoch and pads --line_by_line batches to full length), so it compiles once, on every rank at the
            # same step. Evaluation (no grad, its own batch size) runs eagerly: a second shape would make
            # dynamo recompile the training graph with a dynamic batch dimension. The head's row count varies
            # per batch, so it stays eager too. The exported model is the uncompiled one.
            self.encoder = torch.compile(self.encoder)

    def masked_logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vocabulary logits at the masked positions only ([M, V])."""
        encoder = self.encoder if torch.is_grad_enabled() else self.eval_encoder
        return head_logits(encoder, self.head, self.model, input_ids, positions, attention_mask)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training: the NLL (label-smoothed when asked) summed over the masked positions."""
        logits = self.masked_logits(input_ids, positions, attention_mask)
        return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def eval_nll(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: (NLL sum, correct predictions). The NLL is summed in float64 token by token, so the
        total does not depend on how the examples were batched (invariant 3)."""
        logits = self.masked_logits(input_ids, positions, attention_mask)
        nll = F.cross_entropy(logits.float(), targets, reduction="none").double().sum()
        return nll, (logits.argmax(dim=-1) == targets).sum()


def masked_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, targets) of the labelled tokens of a [B, T] label tensor (-100 elsewhere)."""
    positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().view(-1)
    return positions, labels.reshape(-1)[positions]


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, num_layers + 1 for the head and anything else."""
    if "embeddings." in name:
        return 0
    m = _LAYER.search(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def count_layers(model: nn.Module) -> int:
    found = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))]
    return max(found) + 1 if found else 0


def param_groups(model: nn.Module, weight_decay: float, learning_rate: float,
                 layerwise_lr_decay: Optional[float] = None) -> list[dict]:
    """Weight decay on weight matrices and embeddings only, never on biases nor LayerNorm weights; with
    layer-wise decay, one group per (depth, decay) at learning_rate * factor ** (top depth - depth)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    layers = count_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():  # each parameter once: a tied decoder is the word embeddings
        if not p.requires_grad:
            continue
        decay = not (id(p) in no_decay or name.endswith("bias"))
        depth = layer_depth(name, layers) if layerwise_lr_decay else 0
        lr = learning_rate * layerwise_lr_decay ** (layers + 1 - depth) if layerwise_lr_decay else learning_rate
        group = groups.setdefault((depth, decay), {"params": [], "names": [], "lr": lr,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type in ("cuda", "cpu")  # one fused kernel per step (CPU: torch >= 2.4)
    groups = param_groups(model, cfg.weight_decay, cfg.learning_rate, cfg.layerwise_lr_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=fused or None, foreach=None if fused else True)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.num_warmup_steps is not None:
        return cfg.num_warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


class AppliedStepSchedule:
    """The learning-rate schedule, indexed by the optimizer steps actually applied, kept on the device.

    A step skipped for non-finite gradients (GradScaler's overflow in fp16, the fused skip in bf16/fp32) does
    not advance the schedule, as in the Hugging Face Trainer: early fp16 overflows do not eat the warmup. The
    host never asks whether a step was skipped (that would sync every step): each group's lr is a device
    tensor the fused AdamW kernel reads, refreshed after every step from a table of the library's schedule at
    the applied-step count, which lives on the device too."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], total_steps: int):
        device = optimizer.param_groups[0]["params"][0].device
        self.optimizer = optimizer
        self.base = torch.tensor([g["initial_lr"] for g in optimizer.param_groups], dtype=torch.float64,
                                 device=device)
        self.table = torch.tensor([lr_lambda(s) for s in range(total_steps + 1)], dtype=torch.float64,
                                  device=device)
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.lrs = torch.empty(len(optimizer.param_groups), dtype=torch.float32, device=device)
        self._attach()

    def _attach(self) -> None:
        """Point every group's lr at its slot of self.lrs (again after optimizer.load_state_dict)."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lrs[i]
        self._refresh()

    def _refresh(self) -> None:
        # index_select with a device index: python indexing would turn a 0-dim index into a host int (a sync).
        index = self.applied.clamp(max=self.table.numel() - 1).view(1)
        self.lrs.copy_(self.base * self.table.index_select(0, index))

    def step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """After an optimizer step; skipped is the device flag (0/1) of a step that changed nothing."""
        self.applied += 1 if skipped is None else 1 - skipped
        self._refresh()

    def get_last_lr(self) -> list[float]:
        return self.lrs.tolist()  # a sync: logging only

    def state_dict(self) -> dict:
        return {"applied": int(self.applied)}

    def load_state_dict(self, d: dict) -> None:
        # "last_epoch" is what a checkpoint written with torch's LambdaLR (before this class) holds.
        self.applied.fill_(int(d["applied"] if "applied" in d else d["last_epoch"]))
        self._attach()


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> AppliedStepSchedule:
    """transformers' schedule (its lr_lambda) behind an AppliedStepSchedule."""
    from transformers import get_scheduler
    lambda_lr = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                              num_training_steps=total_steps)
    lr_lambda = lambda_lr.lr_lambdas[0]
    if any(f is not lr_lambda for f in lambda_lr.lr_lambdas):
        raise ValueError("every parameter group must follow the same schedule")
    return AppliedStepSchedule(optimizer, lr_lambda, total_steps)
