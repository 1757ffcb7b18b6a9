"""Text utilities shared by training and inference: the raw fast tokenizer, token ids of many texts at once, and
[CLS] ... [SEP] framing."""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mlm.common.cli import UserError

_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, its plain copy)


def plain_backend(tokenizer):
    """A copy of the fast tokenizer with padding and truncation off, made once per tokenizer object (a copy is a
    round trip through its JSON: 30 ms for BERT's, more for large vocabularies, and a run asks several times).

    Some tokenizer.json files ship with padding/truncation enabled (the MiniLM one pads to 128), and the
    transformers wrapper only resets them around its own calls; the raw backend would pad every text.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; use a model whose tokenizer has a "
            "tokenizer.json (all common BERT-style models do)"
        )
    size, plain = _PLAIN.get(tokenizer, (None, None))
    if plain is None or size != len(tokenizer):  # made again after tokenizer.add_tokens(...)
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_padding()
        plain.no_truncation()
        _PLAIN[tokenizer] = (len(tokenizer), plain)
    return plain


# Normalisers that map a text one character at a time, each character alone: on ASCII text their whole effect is
# a table from each of the 128 characters to at most one character. Replace, Precompiled (SentencePiece's
# charsmap), Strip and Prepend look at more than one character, so a tokenizer with one of them has no fast path.
_PER_CHARACTER_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"})
_MAX_ADDED = 64  # added tokens' ASCII forms searched for in each ASCII text (BERT's: 10)


def _normalizer_types(spec: dict) -> list[str]:
    if spec["type"] == "Sequence":
        return [t for inner in spec["normalizers"] for t in _normalizer_types(inner)]
    return [spec["type"]]


@dataclass(frozen=True)
class _AsciiPath:
    """ASCII texts normalised here by a byte table, then tokenised by a copy of the tokenizer without its
    normaliser. The Rust normaliser tracks every character's alignment to the original text (offsets we never
    use); on BERT's uncased WordPiece it is about 30% of the tokenising time of an ASCII text."""

    bare: Any  # the plain tokenizer, normaliser removed
    table: bytes  # bytes.translate table: each ASCII character to its normalised image ...
    delete: bytes  # ... or deleted (BERT's normaliser drops control characters)
    added: Optional[re.Pattern]  # any added token, as written or normalised: such texts take the full path

    def normalise(self, text: str) -> Optional[str]:
        """text as the tokenizer's normaliser leaves it, or None where the full path must tokenise it."""
        if not text.isascii():
            return None
        normal = text.encode("ascii").translate(self.table, self.delete).decode("ascii")
        if self.added is not None and (self.added.search(text) or self.added.search(normal)):
            return None
        return normal


def _ascii_path(plain) -> Optional[_AsciiPath]:
    """The fast path for ASCII texts, or None where the normaliser is absent (nothing to skip) or not known to act
    a character at a time."""
    from tokenizers import Tokenizer

    definition = plain.to_str()
    spec = json.loads(definition)
    normalizer = spec.get("normalizer")
    if normalizer is None or not set(_normalizer_types(normalizer)) <= _PER_CHARACTER_NORMALIZERS:
        return None
    images = [plain.normalizer.normalize_str(chr(c)) for c in range(128)]
    if any(len(image) > 1 or not image.isascii() for image in images):
        return None
    table = bytes(ord(image) if image else c for c, image in enumerate(images)) + bytes(range(128, 256))
    delete = bytes(c for c, image in enumerate(images) if not image)
    # Added tokens are matched on the text as written or as normalised, depending on each token; without a
    # normaliser that choice changes. A text holding one in either form goes the full way. Only ASCII forms can
    # occur in an ASCII text; past _MAX_ADDED of them the search would cost more than the normaliser it saves.
    contents = {t["content"] for t in spec.get("added_tokens", [])}
    contents = {c for c in contents | {plain.normalizer.normalize_str(c) for c in contents} if c and c.isascii()}
    if len(contents) > _MAX_ADDED:
        return None
    added = re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True)))) if contents else None
    bare = Tokenizer.from_str(definition)
    bare.normalizer = None
    return _AsciiPath(bare, table, delete, added)


def _encode(backend, texts: list[str]) -> list[list[int]]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips offsets we never use
    return [e.ids for e in encode(texts, add_special_tokens=False)] if texts else []


class TextEncoder:
    """Token ids of a batch of texts, without special tokens, exactly as the fast tokenizer gives them: batched
    calls without offsets, and ASCII texts normalised by a byte table where the tokenizer's normaliser allows it
    (_AsciiPath). Picklable, for DataLoader workers."""

    def __init__(self, plain):
        self.plain, self.ascii = plain, _ascii_path(plain)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self.ascii is None:
            return _encode(self.plain, list(texts))
        normal = [self.ascii.normalise(t) for t in texts]
        fast_at = [i for i, n in enumerate(normal) if n is not None]
        slow_at = [i for i, n in enumerate(normal) if n is None]
        out: list[Any] = [None] * len(texts)
        for at, ids in (
            (fast_at, _encode(self.ascii.bare, [normal[i] for i in fast_at])),
            (slow_at, _encode(self.plain, [texts[i] for i in slow_at])),
        ):
            for i, one in zip(at, ids):
                out[i] = one
        return out


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its TextEncoder


def text_encoder(tokenizer) -> TextEncoder:
    """The TextEncoder of a transformers fast tokenizer, made once per tokenizer object (and its plain copy)."""
    plain = plain_backend(tokenizer)
    encoder = _ENCODERS.get(tokenizer)
    if encoder is None or encoder.plain is not plain:
        encoder = _ENCODERS[tokenizer] = TextEncoder(plain)
    return encoder


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
