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
    """AutoModelForMaskedLM, pretrained or from scratch, with the configured attention kernel."""
    from transformers import AutoModelForMaskedLM
    torch.manual_seed(cfg.seed)  # the same fresh weights (head, or whole model) on every rank
    if cfg.from_scratch:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        model = AutoModelForMaskedLM.from_config(config, attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    else:
        try:
            model = AutoModelForMaskedLM.from_pretrained(cfg.model_name_or_path, config=config,
                                                         attn_implementation=cfg.attn_implementation,
                                                         trust_remote_code=cfg.trust_remote_code)
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


class MaskedLMLoss(nn.Module):
    """Wraps a masked LM so DDP sees one module whose forward returns the NLL summed over the masked
    positions only. The caller normalises by the global masked-token count (invariant 2)."""

    def __init__(self, model: nn.Module, compile_encoder: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing  # training loss only; eval_nll never smooths
        self.encoder, self.head = split_encoder_head(model)
        if compile_encoder and self.head is not None:
            # The encoder sees fixed [batch, length] shapes; the head's row count (masked tokens) varies per
            # batch and would recompile, so it stays eager. The exported model is the uncompiled one.
            self.encoder = torch.compile(self.encoder)

    def masked_logits(self, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary logits at the masked positions only ([M, V]) and their targets ([M])."""
        selected = labels != IGNORE_INDEX
        if self.head is not None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            logits = self.head(hidden[selected])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]
        return logits, labels[selected]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training: the NLL (label-smoothed when asked) summed over the masked positions."""
        logits, target = self.masked_logits(input_ids, labels, attention_mask)
        return F.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def eval_nll(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: (NLL sum, correct predictions). The NLL is summed in float64 token by token, so the
        total does not depend on how the examples were batched (invariant 3)."""
        logits, target = self.masked_logits(input_ids, labels, attention_mask)
        nll = F.cross_entropy(logits.float(), target, reduction="none").double().sum()
        return nll, (logits.argmax(dim=-1) == target).sum()


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


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
