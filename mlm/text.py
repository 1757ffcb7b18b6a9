"""Text utilities shared by training and inference: the raw fast tokenizer, and [CLS] ... [SEP] framing."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from .cli import UserError


_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its plain copy


def plain_backend(tokenizer):
    """A copy of the fast tokenizer with padding and truncation off, made once per tokenizer object (a copy is a
    round trip through its JSON: 30 ms for BERT's, more for large vocabularies, and a run asks several times).

    Some tokenizer.json files ship with padding/truncation enabled (the MiniLM one pads to 128), and the
    transformers wrapper only resets them around its own calls; the raw backend would pad every text.
    """
    from tokenizers import Tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer; use a model whose tokenizer has a "
                        "tokenizer.json (all common BERT-style models do)")
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_padding()
        plain.no_truncation()
        _PLAIN[tokenizer] = plain
    return plain


@dataclass(frozen=True)
class Framing:
    """The special tokens around and after an example's text: [CLS] text [SEP] [PAD]..."""
    cls_id: int
    sep_id: int
    pad_id: int = 0


def frame(bodies: np.ndarray, cls_id: int, sep_id: int) -> np.ndarray:
    """Examples [CLS] body [SEP] (int64 [n, body + 2]) from bodies of token ids ([n, body])."""
    n, body = bodies.shape
    ids = np.empty((n, body + 2), dtype=np.int64)
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    ids[:, 1:-1] = bodies
    return ids
