"""The anatomy of a masked LM that training and inference both rely on: where the encoder ends and the
vocabulary head begins, the head run at chosen positions only, and how many positions the model can read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch
from torch import nn

# Models whose position table keeps padding_idx + 1 rows in front of the first real position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer"}

Head = Callable[[torch.Tensor], torch.Tensor]


def _modules(model: nn.Module, *names: str) -> Optional[list[nn.Module]]:
    """The named submodules, or None when the model lacks any (it is not of that family)."""
    found = [getattr(model, n, None) for n in names]
    return None if any(not isinstance(m, nn.Module) for m in found) else found


def _chain(*modules: nn.Module) -> Head:
    def head(h: torch.Tensor) -> torch.Tensor:
        for m in modules:
            h = m(h)
        return h

    return head


def _deberta_head(model: nn.Module) -> Optional[Head]:
    """DeBERTa v1/v2/v3: the legacy BERT-style `cls`, or `lm_predictions`, which reads the input embeddings."""
    if getattr(model, "legacy", True):
        parts = _modules(model, "cls")
        return _chain(*parts) if parts else None
    parts = _modules(model, "lm_predictions")
    embeddings = model.deberta.embeddings.word_embeddings
    return (lambda h: parts[0](h, embeddings)) if parts else None


# A family is a row: the encoder's attribute, then the head's modules in the order the model's own forward
# applies them to the encoder's output (or a function building the head where it is not a plain chain).
# tests/test_families.py checks every row's logits against the whole model's.
_FAMILIES: tuple[tuple[str, Union[tuple[str, ...], Callable[[nn.Module], Optional[Head]]]], ...] = (
    ("bert", ("cls",)),  # BERT, MiniLM, Megatron-BERT
    ("roberta", ("lm_head",)),  # RoBERTa, XLM-R, CamemBERT
    ("deberta", _deberta_head),  # DeBERTa, DeBERTa-v2/v3
    ("distilbert", ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")),
    ("electra", ("generator_predictions", "generator_lm_head")),
    ("albert", ("predictions",)),
    # ModernBERT. Its own sparse_prediction (gathering by labels inside forward) is never used: the encoder is
    # called without labels, and the head runs on the rows head_logits gathers.
    ("model", ("head", "decoder")),
)


def _family_head(model: nn.Module, head: Union[tuple[str, ...], Callable]) -> Optional[Head]:
    if callable(head):
        return head(model)
    parts = _modules(model, *head)
    return _chain(*parts) if parts else None


def split_encoder_head(model: nn.Module) -> tuple[nn.Module, Optional[Head]]:
    """The encoder, and the prediction head as a function of hidden states, for the families we know.

    With the head separate, vocabulary logits are computed only at masked positions (~15% of tokens).
    Unknown families return no head and take the (slower) full-logits path.
    """
    for encoder_name, head_spec in _FAMILIES:
        encoder = getattr(model, encoder_name, None)
        if isinstance(encoder, nn.Module) and encoder is not model:
            head = _family_head(model, head_spec)
            if head is not None:
                return encoder, head
    if isinstance(getattr(model, "lm_head", None), nn.Module) and model.base_model is not model:
        return model.base_model, model.lm_head  # XLM-R, CamemBERT, MPNet and other RoBERTa-likes
    return model, None


def head_path(model: nn.Module) -> str:
    """How training computes this model's vocabulary logits, for the banner and run_config.json."""
    return (
        "masked positions only"
        if split_encoder_head(model)[1] is not None
        else "every position (unknown family: the full model's logits)"
    )


def head_logits(
    encoder: nn.Module,
    head: Optional[Head],
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Vocabulary logits at the flat positions (row * length + column) of input_ids ([M, V]).

    The positions are known on the host (training: from the masks; prediction: from the input ids), so the
    gather is an index_select on the device with no host sync; the head runs on those M rows only."""
    if head is not None:
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return head(hidden.flatten(0, 1).index_select(0, positions))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.flatten(0, 1).index_select(0, positions)


def usable_positions(config) -> int:
    """How many tokens one example may hold, [CLS] and [SEP] included."""
    offset = config.pad_token_id + 1 if config.model_type in _OFFSET_POSITIONS else 0
    return int(getattr(config, "max_position_embeddings", 10**9)) - offset
