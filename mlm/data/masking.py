"""BERT's 80/10/10 masking, written here, vectorised, on the host where the loader's batch is (so the masked
positions and their count are known there without a device sync; the same functions run on a device too).

Every random draw is a counter-based hash of (seed, epoch, example index, position, stream), not a draw from
a stateful generator. So masks are a pure function of those values (invariant 1, docs/DESIGN.md): they do not
depend on the
world size, the batch an example sits in, loader workers or where a run was resumed. Evaluation uses a fixed
epoch value, so its masks never change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100
EVAL_EPOCH = 0xFFFFFFFF  # the "epoch" of evaluation masks: fixed for good, never a training epoch
_M32 = 0xFFFFFFFF
_STREAM_SELECT, _STREAM_ACTION, _STREAM_TOKEN = 1, 2, 3
_UNUSED = re.compile(r"^\[unused\d+\]$")


# How a vocabulary marks words, by tokenizer kind: (name, marker, whether the marker starts a word). A WordPiece
# "##" piece continues a word; a byte-level BPE "Ġ" piece (RoBERTa, ModernBERT) and a SentencePiece/Metaspace
# "▁" piece (DeBERTa-v3, XLM-R, ALBERT) start one.
WORD_CONVENTIONS = (("WordPiece", "##", False), ("byte-level BPE", "\u0120", True), ("SentencePiece", "\u2581", True))


@dataclass(frozen=True)
class MaskingTables:
    """Per-vocabulary lookups, built once from the tokenizer and kept where the masking runs (the host)."""

    special: torch.Tensor  # bool [V]: never selected
    continuation: torch.Tensor  # bool [V]: a piece that continues the word before it (whole-word masking)
    ordinary_ids: torch.Tensor  # long [K]: candidates for random replacement
    mask_id: int
    word_convention: Optional[str] = None  # WORD_CONVENTIONS' name, None when the vocabulary shows none


def word_convention(pieces: list[str]) -> Optional[tuple[str, str, bool]]:
    """The WORD_CONVENTIONS row whose marker begins the most pieces of the vocabulary, when it begins at least
    1% of them; None when the vocabulary shows no word boundaries (whole-word masking is then refused)."""
    count, row = max(((sum(p.startswith(row[1]) for p in pieces), row) for row in WORD_CONVENTIONS), key=lambda c: c[0])
    return row if count and count >= 0.01 * len(pieces) else None


@dataclass(frozen=True)
class MaskingSpec:
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    seed: int = 42


# The head's row count for a batch shape (see masked_capacity): the expected masked count plus this many
# standard deviations, so that one batch in many millions overflows. Whole-word masking selects a word's pieces
# together, which widens the spread by about the square root of the pieces per word; 2 covers words of four.
CAPACITY_SIGMAS = 6.0
WHOLE_WORD_SPREAD = 2.0


def masked_capacity(rows: int, length: int, spec: MaskingSpec) -> int:
    """The fixed number of masked positions a [rows, length] batch hands the head and the loss.

    Each token is selected with probability p, so a batch's masked count varies from batch to batch; padding
    the positions to a capacity fixed by the shape (unused slots carry the ignored label) gives the head and the
    loss the same shapes at every step, so they compile with the encoder into one graph that is never
    recompiled. A multiple of 8 (tensor cores), never more than the batch's tokens."""
    tokens = rows * length
    p = spec.mlm_probability
    spread = math.sqrt(tokens * p * (1.0 - p)) * (WHOLE_WORD_SPREAD if spec.whole_word_mask else 1.0)
    return min(tokens, 8 * math.ceil((tokens * p + CAPACITY_SIGMAS * spread) / 8))


def masked_slots(count: int, capacity: int, tokens: int) -> int:
    """The slots a batch with `count` masked tokens uses: the capacity, or for the rare batch above it the
    capacity doubled until it holds them all (exact, at the cost of one more compiled shape), at most `tokens`."""
    slots = capacity
    while slots < count:
        slots *= 2
    return max(count, min(slots, tokens))


def build_masking_tables(tokenizer, device: torch.device | str = "cpu") -> MaskingTables:
    """Special tokens (and padding) are never selected; random replacements are ordinary tokens only,
    never special tokens nor the [unusedN] placeholders, which no real text contains."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    special = torch.zeros(size, dtype=torch.bool)
    special[sorted(set(tokenizer.all_special_ids))] = True
    continuation = torch.zeros(size, dtype=torch.bool)
    unused = torch.zeros(size, dtype=torch.bool)
    convention = word_convention(list(vocab))
    name, marker, marks_start = convention or (None, "##", False)
    # Indices gathered in Python, written in one assignment each: a tensor write per piece took 0.3 s for
    # BERT's 30k pieces, on every rank of every run, and 2.5 s for XLM-R's 250k.
    continuation[[i for piece, i in vocab.items() if piece.startswith(marker) != marks_start]] = True
    unused[[i for piece, i in vocab.items() if _UNUSED.match(piece)]] = True
    # Tokens added to the tokenizer ([LEAD], a domain term) are words of their own: each starts a word.
    continuation[[i for i in tokenizer.get_added_vocab().values() if i < size]] = False
    ordinary = torch.nonzero(~special & ~unused).flatten()
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token, so it cannot be used for masked-LM training")
    return MaskingTables(
        special=special.to(device),
        continuation=continuation.to(device),
        ordinary_ids=ordinary.to(device),
        mask_id=int(tokenizer.mask_token_id),
        word_convention=name,
    )


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32, in 16-bit halves so no int64 product overflows."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix_int(h: int) -> int:
    """_fmix of one host integer: a scalar part of a hash is mixed on the host, so no scalar tensor is copied
    to the device (on CUDA each such copy would wait for the stream)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _combine_int(h: int, x: int) -> int:
    return _fmix_int(h ^ ((x & _M32) * 0x9E3779B1 & _M32))


def _combine(h: torch.Tensor, x: torch.Tensor | int) -> torch.Tensor:
    mixed = _mul32(x & _M32, 0x9E3779B1) if isinstance(x, torch.Tensor) else (x & _M32) * 0x9E3779B1 & _M32
    return _fmix(h ^ mixed)


def token_hashes(seed: int, epoch: int, example_index: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """A 32-bit hash per (example, position): int64 tensor [B, length] with values in [0, 2**32)."""
    device = example_index.device
    h = _combine_int(_fmix_int(seed & _M32), epoch)  # the scalar part, on the host
    h = _combine(torch.full(example_index.shape, h, dtype=torch.int64, device=device), example_index.to(torch.int64))
    pos = torch.arange(length, dtype=torch.int64, device=device)
    return _combine(_combine(h[:, None] ^ _mul32(pos, 0x27D4EB2F)[None, :], pos), stream)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _word_start_positions(input_ids: torch.Tensor, tables: MaskingTables) -> torch.Tensor:
    """For each token, the position of the first piece of its word ([B, T])."""
    special = tables.special[input_ids]
    prev_special = torch.ones_like(special)
    prev_special[:, 1:] = special[:, :-1]
    # A special token, and the piece right after one (a word cut by a chunk boundary, or the first word of a
    # byte-level BPE text, which has no "Ġ"), start a word.
    is_start = ~tables.continuation[input_ids] | special | prev_special
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values


def mask_tokens(
    input_ids: torch.Tensor, example_index: torch.Tensor, epoch: int, spec: MaskingSpec, tables: MaskingTables
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels): labels hold the original id at selected positions, else -100."""
    batch, length = input_ids.shape
    maskable = ~tables.special[input_ids]
    u_select = _uniform(token_hashes(spec.seed, epoch, example_index, length, _STREAM_SELECT))
    if spec.whole_word_mask:
        # Every piece of a word takes the draw of the word's first piece, so a word is selected whole.
        u_select = u_select.gather(1, _word_start_positions(input_ids, tables))
    selected = maskable & (u_select < spec.mlm_probability)
    u_action = _uniform(token_hashes(spec.seed, epoch, example_index, length, _STREAM_ACTION))
    to_mask = selected & (u_action < spec.mask_replace_prob)
    to_random = selected & ~to_mask & (u_action < spec.mask_replace_prob + spec.random_replace_prob)
    random_pick = token_hashes(spec.seed, epoch, example_index, length, _STREAM_TOKEN) % tables.ordinary_ids.numel()
    masked = torch.where(to_mask, torch.full_like(input_ids, tables.mask_id), input_ids)
    masked = torch.where(to_random, tables.ordinary_ids[random_pick], masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels
