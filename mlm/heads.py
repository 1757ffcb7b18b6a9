"""The anatomy of a masked LM that training and inference both rely on: where the encoder ends and the
vocabulary head begins, the head run at chosen positions only, and how many positions the model can read."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# Models whose position table keeps padding_idx + 1 rows in front of the first real position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer"}

Head = Callable[[torch.Tensor], torch.Tensor]


def split_encoder_head(model: nn.Module) -> tuple[nn.Module, Optional[Head]]:
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


def head_logits(encoder: nn.Module, head: Optional[Head], model: nn.Module, input_ids: torch.Tensor,
                positions: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
