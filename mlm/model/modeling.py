"""Model and tokenizer construction for training, and the masked-only MLM loss DDP wraps."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlm.common.cli import UserError
from mlm.common.hub import LOAD_ERRORS, load_error
from mlm.config import TrainConfig, token_list
from mlm.data.masking import IGNORE_INDEX
from mlm.model.heads import head_logits, split_encoder_head, usable_positions

log = logging.getLogger("mlm")
CAPTURING_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def load_model_config(cfg: TrainConfig):
    """The architecture config: of the pretrained model, or of --config_name (+ --config_overrides)."""
    from transformers import AutoConfig, BertConfig

    name = cfg.model_name_or_path or cfg.config_name
    try:
        config = (
            AutoConfig.from_pretrained(name, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
            if name
            else BertConfig()
        )
    except LOAD_ERRORS as e:
        raise load_error("model config", name, e) from None
    if cfg.from_scratch and cfg.config_overrides:
        try:
            config.update_from_string(cfg.config_overrides)
        except ValueError as e:
            raise UserError(
                f"--config_overrides {cfg.config_overrides!r}: {e}; use 'key=value,key=value' with "
                "keys of the model config"
            ) from None
    return config


def _masked_lm_class(config):
    """The transformers class AutoModelForMaskedLM builds for this config; None when remote code decides."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    try:
        return MODEL_FOR_MASKED_LM_MAPPING[type(config)]
    except KeyError:
        return None


def check_attention(kernel: str, config) -> None:
    """An explicit --attn_implementation the model or this machine cannot run is a one-line error naming auto,
    before any weights load (transformers would say it after, in a paragraph)."""
    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package, which is not "
            "installed; pip install flash-attn on a CUDA machine, or use --attn_implementation auto"
        )
    support = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(kernel)
    model_class = _masked_lm_class(config)
    if support and model_class is not None and not getattr(model_class, support, False):
        raise UserError(
            f"{model_class.__name__} has no {kernel} attention kernel; use --attn_implementation auto "
            "(transformers picks SDPA where a model has it, eager where not) or eager"
        )


def attention_argument(kernel: str) -> Optional[str]:
    """from_pretrained's attn_implementation for --attn_implementation: None lets transformers choose (auto)."""
    return None if kernel == "auto" else kernel


def attention_kernel(model: nn.Module) -> str:
    """The attention kernel the loaded model runs (what auto resolved to), for the banner and run_config.json."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def check_model_config(cfg: TrainConfig, config) -> None:
    check_attention(cfg.attn_implementation, config)
    limit = usable_positions(config)
    if cfg.max_seq_length > limit:
        raise UserError(
            f"--max_seq_length {cfg.max_seq_length} exceeds the model's {limit} position embeddings; "
            f"use --max_seq_length {limit} or less"
        )
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        log.info("bf16 on CPU: autocast runs matmuls in bf16, which is slow on CPUs without AMX")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer_name or cfg.model_name_or_path or cfg.config_name
    try:
        tok = AutoTokenizer.from_pretrained(
            name, use_fast=True, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code
        )
    except LOAD_ERRORS as e:
        raise load_error("tokenizer", name, e) from None
    if tok.mask_token_id is None:
        raise UserError(f"the tokenizer {name!r} has no mask token, so it cannot train a masked LM")
    added = token_list("add_tokens", cfg.add_tokens)
    special = token_list("add_special_tokens", cfg.add_special_tokens)
    if added:
        tok.add_tokens(added)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    return tok


@dataclass(frozen=True)
class LoadReport:
    """What building the model changed or could not load, for the banner and the model card."""

    fresh: list[str]  # tensors the checkpoint lacked, initialised afresh (empty from scratch)
    resized: Optional[tuple[int, int]] = None  # (embeddings before, after) when the tokenizer outgrew the model


def fresh_tensors(loading_info: dict) -> list[str]:
    """The weights from_pretrained(output_loading_info=True) initialised afresh, sorted: the checkpoint's
    missing keys less the position-id buffer, which is not a weight."""
    return sorted(k for k in loading_info.get("missing_keys", ()) if "embeddings.position_ids" not in k)


def fresh_head_text(fresh: list[str]) -> str:
    """ "the checkpoint lacks 6 tensor(s) of the masked-LM model, initialised afresh: cls.predictions.bias, ..."."""
    shown = ", ".join(fresh[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "")
    return f"the checkpoint lacks {len(fresh)} tensor(s) of the masked-LM model, initialised afresh: {shown}"


def build_model_reporting(cfg: TrainConfig, config, tokenizer) -> tuple[nn.Module, LoadReport]:
    """AutoModelForMaskedLM, pretrained or from scratch, with the configured attention kernel.

    The master weights are fp32 whatever dtype the checkpoint's config records: transformers 5 loads a model in
    that dtype by default, so an fp16-saved model would give fp16 parameters (GradScaler cannot unscale them)
    and a bf16 one pure-bf16 training. Autocast supplies the low precision.

    Also returns the tensors the checkpoint lacked, initialised afresh (transformers' loading report): for
    DeBERTa-v3 or a sentence encoder, the whole masked-LM head."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(cfg.seed)  # the same fresh weights (head, or whole model) on every rank
    attention = attention_argument(cfg.attn_implementation)
    if cfg.from_scratch:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        model = AutoModelForMaskedLM.from_config(
            config, attn_implementation=attention, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
        fresh: list[str] = []  # everything is fresh, and said so as "from scratch"
    else:
        try:
            model, report = AutoModelForMaskedLM.from_pretrained(
                cfg.model_name_or_path,
                output_loading_info=True,
                config=config,
                revision=cfg.model_revision,
                attn_implementation=attention,
                trust_remote_code=cfg.trust_remote_code,
                dtype=torch.float32,
            )
        except LOAD_ERRORS as e:
            raise load_error("model", cfg.model_name_or_path, e) from None
        fresh = fresh_tensors(report)
    resized = None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        resized = (model.get_input_embeddings().num_embeddings, len(tokenizer))
        # Added tokens, or a tokenizer larger than the model: the embeddings (and a tied or untied output layer)
        # grow to hold them, the new rows initialised as transformers does (the mean and covariance of the old).
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, LoadReport(fresh, resized)


def build_model(cfg: TrainConfig, config, tokenizer) -> nn.Module:
    """build_model_reporting's model alone."""
    return build_model_reporting(cfg, config, tokenizer)[0]


class MaskedLMLoss(nn.Module):
    """Wraps a masked LM so DDP sees one module whose forward returns the NLL summed over the masked
    positions only. The caller normalises by the global masked-token count (invariant 2, docs/DESIGN.md).

    `model` is the Hugging Face masked LM, the only child module: the encoder and head views of it are kept in
    a plain tuple, so each parameter has one name (model.*) in the state dict and in DDP."""

    def __init__(
        self,
        model: nn.Module,
        compile_training: bool = False,
        label_smoothing: float = 0.0,
        compile_mode: str = "default",
    ):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing  # training loss only; eval_nll never smooths
        self._views = split_encoder_head(model)  # (encoder, head), a tuple: not registered twice
        # The whole training forward (encoder, head at the masked slots, loss) compiles into one graph: the
        # loader gives one [batch, length] shape, and the masked positions come padded to a capacity fixed by
        # that shape (engine.prepare_batch), so every step has the same shapes and the graph compiles once, on
        # every rank at the same step. Evaluation (no grad, its own batch size) runs eagerly: another shape
        # would make dynamo recompile the training graph with dynamic dimensions. The exported model is the
        # uncompiled one.
        # compile_mode reduce-overhead also captures the graph's launches as CUDA graphs (replayed per step).
        self._captured = compile_training and compile_mode in CAPTURING_MODES
        self._training_nll = torch.compile(self._nll, mode=compile_mode) if compile_training else self._nll

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (the tied word embeddings among them): what --head_warmup_steps holds still."""
        encoder, head = self._views
        return [] if head is None else list(encoder.parameters())

    def masked_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Vocabulary logits at the masked positions only ([M, V])."""
        encoder, head = self._views
        return head_logits(encoder, head, self.model, input_ids, positions, attention_mask)

    def _nll(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        logits = self.masked_logits(input_ids, positions, attention_mask)
        # Slots whose target is IGNORE_INDEX (the padding up to the capacity) add nothing, nor to the gradient.
        return F.cross_entropy(
            logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Training: the NLL (label-smoothed when asked) summed over the masked positions."""
        if torch.is_grad_enabled():
            if self._captured:  # a new step of CUDA-graph replays: the last one's outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            return self._training_nll(input_ids, positions, targets, attention_mask)
        return self._nll(input_ids, positions, targets, attention_mask)

    @torch.no_grad()
    def eval_nll(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: (NLL sum, correct predictions). The NLL is summed in float64 token by token, so the
        total does not depend on how the examples were batched (invariant 3)."""
        logits = self.masked_logits(input_ids, positions, attention_mask)
        nll = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX).double().sum()
        return nll, (logits.argmax(dim=-1) == targets).sum()


def masked_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, targets) of the labelled tokens of a [B, T] label tensor (-100 elsewhere)."""
    positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().view(-1)
    return positions, labels.reshape(-1)[positions]
