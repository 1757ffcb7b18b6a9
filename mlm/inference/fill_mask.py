"""Fill-mask prediction: the top-k tokens at each mask, and the top-k joint fills of inputs with several masks.

    from mlm.inference.fill_mask import FillMask
    preds = FillMask("outputs/my-run").predict(["The capital of France is [MASK]."], top_k=5)

**Per mask** (`Prediction.masks`): the softmax over the vocabulary at that position, given the input as
written (the other masks stay masked). These are the numbers of transformers' `pipeline("fill-mask")`:
same scores, same order, same `token` and `sequence` strings.

**Joint fills** (`Prediction.fills`): complete sentences with every mask filled. Independent per-mask guesses
can contradict each other ("he was was a good man"), so the fills are decoded step by step: a beam search over
partial fillings, where each step takes, for every sentence on the beam, the remaining mask whose best token is
most probable, tries its `num_beams` most probable tokens, and re-runs the model on the extended sentences. A
fill's `log_score` is the sum of the log-probabilities of its tokens, each taken when it was filled (so given
the tokens filled before it): the chain-rule log-likelihood of the fill in its fill order. `score` is its exp,
the product of those probabilities, in (0, 1]. Two paths that reach the same filling are merged, keeping the
higher score. Every fill of an input fills the same number of masks, so scores compare without a length
penalty. With one mask the fills are that mask's top tokens as sentences, with the same scores.

Inference is batched (inputs sorted by length, padded per batch), runs under `torch.inference_mode()`, and
the vocabulary head runs only at mask positions (as in training; see `mlm.model.modeling.split_encoder_head`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from mlm.common.cli import UserError
from mlm.data.text import plain_backend
from mlm.inference.loading import load_model, load_onnx, max_input_length, resolve_device, resolve_model_path
from mlm.model.heads import head_logits, split_encoder_head

log = logging.getLogger("mlm")
# Either spelling of a mask, BERT's or RoBERTa's, in any case; translated to the tokenizer's own mask token.
_MASK_SPELLINGS = re.compile(r"\[mask\]|<mask>", re.IGNORECASE)


# Built-in sentences: predict.py's default inputs and the W&B predictions table at each evaluation.
# The widest beam of the joint fills of a text with several masks: each step tries beam x beam fillings, so
# memory and time grow with its square (a --top_k of 100000 asked for 10^10 and was killed at 24 GB).
MAX_JOINT_BEAMS = 256
SAMPLE_SENTENCES = (
    "The capital of France is [MASK].",
    "Learning a new language can be [MASK] but rewarding.",
    "The [MASK] barked at the postman all morning.",
    "She poured a cup of [MASK] and opened the newspaper.",
    "The film was released in [MASK] and received positive reviews.",
    "You are my [MASK] that shines my [MASK].",
    "He [MASK] [MASK] [MASK] a good man.",
    "The [MASK] of the [MASK] was played in [MASK].",
)


# ---------------------------------------------------------------------- results
@dataclass
class Candidate:
    """One token proposed for one mask."""

    token_id: int
    token: str  # the token decoded on its own ("paris", "##ing"), as the pipeline's token_str
    score: float  # its probability at this mask, given the input as written
    sequence: str  # the input with this token at this mask (other masks kept), special tokens removed


@dataclass
class MaskPrediction:
    position: int  # index of the mask in the tokenised input ([CLS] is 0)
    candidates: list[Candidate]


@dataclass
class JointFill:
    """The input with every mask filled."""

    sequence: str
    tokens: list[str]  # the token at each mask, masks left to right
    token_ids: list[int]
    score: float  # exp(log_score): the product of the tokens' probabilities as they were filled
    log_score: float  # sum of the log-probabilities of the tokens, each given the ones filled before it
    fill_order: list[int]  # mask numbers (0 = leftmost) in the order they were filled


@dataclass
class Prediction:
    text: str  # the input as given
    model: str
    masks: list[MaskPrediction]
    fills: list[JointFill]
    compare: Optional[Prediction] = None  # the same input through a second model (predict.py --compare)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.compare is None:
            del d["compare"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prediction:
        return cls(
            text=d["text"],
            model=d["model"],
            masks=[MaskPrediction(m["position"], [Candidate(**c) for c in m["candidates"]]) for m in d["masks"]],
            fills=[JointFill(**f) for f in d["fills"]],
            compare=cls.from_dict(d["compare"]) if d.get("compare") else None,
        )


@dataclass(order=True)
class _Partial:
    """A sentence on the beam: some masks filled. Ordered by (-log_score, ids) for a deterministic beam."""

    neg_log_score: float
    ids: tuple[int, ...]
    order: tuple[int, ...] = field(compare=False)


# ---------------------------------------------------------------------- prediction
class FillMask:
    """Fill-mask predictions from a masked LM: `FillMask(path_or_hub_id)` or `FillMask(model, tokenizer)`."""

    def __init__(
        self,
        model: Union[str, os.PathLike, nn.Module],
        tokenizer: Any = None,
        device: str = "auto",
        name: Optional[str] = None,
        onnx: Optional[str] = None,
        flag: str = "--model",
    ):
        """flag: the option that named the model, for error lines (predict.py's --compare names its own)."""
        warning: Optional[str] = None  # a fresh (untrained) MLM head, said where the predictions are shown
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if isinstance(model, str) and onnx:  # the graph runs; the directory gives the tokenizer and config
            name = name or f"{model} (ONNX {onnx})"
            model, tokenizer = load_onnx(resolve_model_path(model, flag), onnx, flag)
        elif isinstance(model, str):
            name = name or model
            model, tokenizer, warning = load_model(resolve_model_path(model, flag), resolve_device(device), flag)
        elif tokenizer is None:
            raise TypeError("FillMask(model, tokenizer): a model object needs its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = name or type(model).__name__
        self.warning = warning
        self.device = model.device if hasattr(model, "device") else next(model.parameters()).device
        self.encoder, self.head = split_encoder_head(model)
        self.max_length = max_input_length(model.config, tokenizer)
        self.mask_id: int = tokenizer.mask_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._special = set(tokenizer.all_special_ids) - {self.mask_id}
        # The raw fast tokenizer, padding and truncation off: a long input is reported, never cut silently.
        self._backend = plain_backend(tokenizer)

    # -------------------------------------------------------------- inputs
    def normalize(self, text: str) -> str:
        """[MASK] and <mask> (any case) become the tokenizer's own mask token."""
        return _MASK_SPELLINGS.sub(lambda _: self.tokenizer.mask_token, text)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens; every input checked first (empty, no mask, too long)."""
        for i, t in enumerate(texts):
            if not t.strip():
                raise UserError(
                    f"input {i + 1} is empty; give a text with {self.tokenizer.mask_token} where the "
                    "model should predict a token"
                )
        encodings = self._backend.encode_batch([self.normalize(t) for t in texts], add_special_tokens=True)
        seqs = [e.ids for e in encodings]
        for i, (t, ids) in enumerate(zip(texts, seqs)):
            if self.mask_id not in ids:
                raise UserError(
                    f"input {i + 1} ({_short(t)!r}) has no mask token; put "
                    f"{self.tokenizer.mask_token} where the model should predict a token"
                )
            if len(ids) > self.max_length:
                raise UserError(
                    f"input {i + 1} ({_short(t)!r}) is {len(ids)} tokens long but the model reads at "
                    f"most {self.max_length}; shorten it (nothing is cut off silently)"
                )
        return seqs

    def target_ids(self, targets: Sequence[str]) -> list[int]:
        """Vocabulary ids of the target words, as the HF pipeline resolves them: the word itself when it is
        in the vocabulary, else the first token of its tokenisation (with a warning)."""
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in targets:
            tid = vocab.get(target)
            if tid is None:
                pieces = self._backend.encode(target, add_special_tokens=False).ids
                if not pieces or pieces[0] == self.tokenizer.unk_token_id:  # the pipeline would score [UNK]
                    log.warning(f"warning: target {target!r} is not in this vocabulary; ignored")
                    continue
                tid = pieces[0]
                if len(pieces) > 1:  # a case or accent difference alone ("Paris" -> "paris") needs no warning
                    log.warning(
                        f"warning: target {target!r} is {len(pieces)} tokens in this vocabulary; scoring "
                        f"its first token {self.tokenizer.convert_ids_to_tokens(tid)!r}"
                    )
            ids.append(tid)
        ids = sorted(set(ids))
        if not ids:
            raise UserError(
                f"--targets {','.join(targets)!r}: none of the words is in the model's vocabulary; "
                "give words the tokenizer knows"
            )
        return ids

    # -------------------------------------------------------------- the model
    def _forward_masks(self, seqs: Sequence[Sequence[int]], batch_size: int) -> list[torch.Tensor]:
        """Float32 vocabulary logits at each sequence's mask positions ([masks, V] each), in input order.

        Sequences are sorted by length and padded per batch, so a batch costs little more than its longest
        member; the head runs only at mask positions."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[Optional[torch.Tensor]] = [None] * len(seqs)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(seqs[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    attention[r, : len(seqs[i])] = 1
                selected = ids == self.mask_id  # on the host: the positions need no sync
                positions = selected.view(-1).nonzero().view(-1)
                counts = selected.sum(dim=1).tolist()
                ids, attention, positions = (t.to(self.device) for t in (ids, attention, positions))
                logits = head_logits(self.encoder, self.head, self.model, ids, positions, attention)
                for i, chunk in zip(rows, logits.float().cpu().split(counts)):
                    out[i] = chunk
        return out  # type: ignore[return-value]

    # -------------------------------------------------------------- decoding
    def _sequence(self, ids: Sequence[int]) -> str:
        """The text of ids without [CLS]/[SEP]/padding; masks not yet filled stay visible."""
        return self.tokenizer.decode([t for t in ids if t not in self._special], skip_special_tokens=False)

    def _per_mask(
        self, seq: list[int], logits: torch.Tensor, top_k: int, targets: Optional[list[int]]
    ) -> list[MaskPrediction]:
        probs = logits.softmax(dim=-1)  # as the pipeline: softmax over the whole vocabulary, then the targets
        if targets is not None:
            probs = probs[:, targets]
        values, indices = probs.topk(min(top_k, probs.shape[-1]))
        positions = [p for p, t in enumerate(seq) if t == self.mask_id]
        result = []
        for pos, vals, idxs in zip(positions, values.tolist(), indices.tolist()):
            cands = []
            for v, j in zip(vals, idxs):
                tok = targets[j] if targets is not None else j
                filled = list(seq)
                filled[pos] = tok
                cands.append(Candidate(tok, self.tokenizer.decode([tok]), v, self._sequence(filled)))
            result.append(MaskPrediction(pos, cands))
        return result

    def _expand(
        self,
        state: _Partial,
        logits: torch.Tensor,
        beam: int,
        targets: Optional[list[int]],
        into: dict[tuple[int, ...], _Partial],
    ) -> None:
        """Fill the most confident remaining mask of one beam sentence with each of its `beam` best tokens."""
        logp = logits.log_softmax(dim=-1)
        if targets is not None:
            logp = logp[:, targets]
        j = int(logp.max(dim=-1).values.argmax())  # the remaining mask whose best token is most probable
        pos = [p for p, t in enumerate(state.ids) if t == self.mask_id][j]
        values, indices = logp[j].topk(min(beam, logp.shape[-1]))
        for v, k in zip(values.tolist(), indices.tolist()):
            ids = list(state.ids)
            ids[pos] = targets[k] if targets is not None else k
            child = _Partial(state.neg_log_score - v, tuple(ids), state.order + (pos,))
            known = into.get(child.ids)
            if known is None or child.neg_log_score < known.neg_log_score:
                into[child.ids] = child

    def _joint_fills(
        self,
        seqs: list[list[int]],
        first: list[torch.Tensor],
        top_k: int,
        beam: int,
        targets: Optional[list[int]],
        batch_size: int,
    ) -> list[list[JointFill]]:
        """Beam search over fillings, all inputs at once: one batched forward per fill step."""
        beams = [[_Partial(0.0, tuple(s), ())] for s in seqs]
        logits = [[f] for f in first]  # the first step reuses the per-mask forward
        active = list(range(len(seqs)))
        while active:
            for i in active:
                expanded: dict[tuple[int, ...], _Partial] = {}
                for state, lg in zip(beams[i], logits[i]):
                    self._expand(state, lg, beam, targets, expanded)
                beams[i] = sorted(expanded.values())[:beam]
            active = [i for i in active if self.mask_id in beams[i][0].ids]
            flat = [(i, s.ids) for i in active for s in beams[i]]
            outs = self._forward_masks([ids for _, ids in flat], batch_size)
            for i in active:
                logits[i] = []
            for (i, _), out in zip(flat, outs):
                logits[i].append(out)
        return [[self._fill(seq, state) for state in beam_i[:top_k]] for seq, beam_i in zip(seqs, beams)]

    def _fill(self, seq: list[int], state: _Partial) -> JointFill:
        positions = [p for p, t in enumerate(seq) if t == self.mask_id]
        ids = [state.ids[p] for p in positions]
        log_score = -state.neg_log_score
        return JointFill(
            sequence=self._sequence(state.ids),
            tokens=[self.tokenizer.decode([t]) for t in ids],
            token_ids=ids,
            score=math.exp(log_score),
            log_score=log_score,
            fill_order=[positions.index(p) for p in state.order],
        )

    # -------------------------------------------------------------- the API
    def predict(
        self,
        texts: Union[str, Sequence[str]],
        top_k: int = 5,
        targets: Optional[Sequence[str]] = None,
        batch_size: int = 32,
        num_beams: Optional[int] = None,
    ) -> list[Prediction]:
        """Per-mask top-k and the top-k joint fills for each text (a list, in input order).

        targets restricts every candidate to these words (scores stay probabilities over the whole vocabulary);
        num_beams is the beam width of the joint fills (default and minimum: top_k)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for name, v in (("top_k", top_k), ("batch_size", batch_size), ("num_beams", num_beams or 1)):
            if v < 1:
                raise UserError(f"--{name} must be at least 1, got {v}")
        if not texts:
            raise UserError("no input text; give at least one text with " + self.tokenizer.mask_token)
        seqs = self.encode(texts)
        beam = max(num_beams or top_k, top_k)
        if beam > MAX_JOINT_BEAMS and any(seq.count(self.mask_id) > 1 for seq in seqs):
            raise UserError(
                f"--top_k {top_k}{f' --num_beams {num_beams}' if num_beams else ''} on a text with several masks: "
                f"the joint fills try beam x beam fillings a step, so the beam is at most {MAX_JOINT_BEAMS}; "
                f"give --top_k and --num_beams of {MAX_JOINT_BEAMS} or less (one mask per text has no such limit)"
            )
        target_ids = self.target_ids(targets) if targets else None
        first = self._forward_masks(seqs, batch_size)
        fills = self._joint_fills(seqs, first, top_k, beam, target_ids, batch_size)
        return [
            Prediction(text, self.name, self._per_mask(seq, lg, top_k, target_ids), f)
            for text, seq, lg, f in zip(texts, seqs, first, fills)
        ]


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------- text for people
def format_probability(p: float) -> str:
    """A probability as predict.py and the web demo show it: 4 decimals, or 2 significant digits below 0.001."""
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def render(pred: Prediction, indent: str = "  ") -> list[str]:
    """Lines a person reads at a glance: each mask's top tokens with their probabilities; then, with several
    masks, the joint fills with their scores (see the module docstring)."""
    lines = []
    n = len(pred.masks)
    width = max((len(c.token) for m in pred.masks for c in m.candidates), default=0)
    for k, m in enumerate(pred.masks):
        label = "mask" if n == 1 else f"mask {k + 1}"
        cells = "  ".join(f"{c.token:<{width}} {format_probability(c.score)}" for c in m.candidates)
        lines.append(f"{indent}{label:<7} {cells}")
    if n > 1:
        lines.append(f"{indent}joint fills:")
        lines += [f"{indent}  {format_probability(f.score)}  {f.sequence}" for f in pred.fills]
    return lines


def sample_rows(model: nn.Module, tokenizer: Any, top_k: int = 5) -> list[list[Any]]:
    """The built-in sentences through a model being trained, as rows of the W&B predictions table: (text, the
    top tokens of each mask with their probabilities, the best joint fill, its score)."""
    rows = []
    for p in FillMask(model, tokenizer, name="training").predict(list(SAMPLE_SENTENCES), top_k=top_k):
        per_mask = " | ".join(", ".join(f"{c.token} {c.score:.3f}" for c in m.candidates) for m in p.masks)
        best = p.fills[0] if p.fills else None
        rows.append([p.text, per_mask, best.sequence if best else "", best.score if best else None])
    return rows
