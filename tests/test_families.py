"""Every encoder family on its own small random model (tests/families.py), in one process: the masked-only head
(issue 23 b), the attention kernel (a), and whole-word masking for every tokenizer kind (c)."""

from __future__ import annotations

import pytest
import torch
from families import (
    FAMILIES,
    byte_level_bpe,
    save_family,
    trained_wordpiece,
    training_text,
    unigram_metaspace,
    wordpiece,
)

from mlm.common.cli import UserError
from mlm.data.masking import IGNORE_INDEX, MaskingSpec, _word_start_positions, build_masking_tables, mask_tokens
from mlm.model.heads import head_logits, split_encoder_head
from mlm.model.modeling import MaskedLMLoss, attention_kernel, check_attention, masked_positions


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    return {name: save_family(name, str(tmp_path_factory.mktemp(name))) for name in FAMILIES}


def _load(directory: str, attn_implementation=None):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def _masked_batch(tok, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels): two padded texts with ~15% of their tokens masked."""
    batch = tok(training_text(2, seed=seed), padding=True, return_tensors="pt")
    tables = build_masking_tables(tok)
    ids, labels = mask_tokens(
        batch["input_ids"], torch.arange(2), 0, MaskingSpec(mlm_probability=0.3, seed=seed), tables
    )
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return ids, batch["attention_mask"], labels


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_masked_only_head_equals_the_whole_model(name, family_dirs):
    model, tok = _load(family_dirs[name])
    encoder, head = split_encoder_head(model)
    assert head is not None and encoder is not model, f"{name} fell back to full logits"
    ids, attention, labels = _masked_batch(tok)
    positions, targets = masked_positions(labels)
    assert len(positions) > 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention)
        ours = head_logits(encoder, head, model, ids, positions, attention)
        assert (ours - full.logits.flatten(0, 1)[positions]).abs().max().item() <= 1e-6
        # Our summed NLL over the masked positions, against the model's own mean loss on the same labels.
        summed = MaskedLMLoss(model)(ids, positions, targets, attention)
        own = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert abs(summed.item() / len(positions) - own.item()) <= 1e-5 * own.item()


def test_an_unknown_family_takes_the_full_logits_path(family_dirs):
    class Unknown(torch.nn.Module):  # a masked LM whose layout is in no row of the table
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model, _ = _load(family_dirs["bert"])
    wrapped = Unknown(model)
    assert split_encoder_head(wrapped) == (wrapped, None)


def test_attention_auto_is_transformers_choice_and_an_impossible_kernel_is_one_line(family_dirs):
    from transformers import AutoConfig

    deberta = AutoConfig.from_pretrained(family_dirs["deberta-v3"])
    check_attention("auto", deberta)
    assert attention_kernel(_load(family_dirs["deberta-v3"])[0]) == "eager"  # DeBERTa has no SDPA kernel
    assert attention_kernel(_load(family_dirs["modernbert"])[0]) == "sdpa"
    with pytest.raises(
        UserError,
        match=r"DebertaV2ForMaskedLM has no sdpa attention kernel; use "
        r"--attn_implementation auto",
    ):
        check_attention("sdpa", deberta)
    check_attention("sdpa", AutoConfig.from_pretrained(family_dirs["roberta"]))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="flash-attn package, which is not installed.*--attn_implementation auto"):
            check_attention("flash_attention_2", deberta)


# ---------------------------------------------------------------------- whole-word masking, every tokenizer kind
# Tokenizers trained here with the `tokenizers` library, and MiniLM's (bert-base-uncased's) WordPiece vocabulary.
TOKENIZER_KINDS = {
    "WordPiece": trained_wordpiece,
    "WordPiece (bert-base-uncased)": wordpiece,
    "byte-level BPE": byte_level_bpe,
    "SentencePiece": unigram_metaspace,
}


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_whole_words_agree_with_the_tokenizer_and_are_masked_all_or_none(kind, tmp_path):
    tok = TOKENIZER_KINDS[kind](str(tmp_path))
    tables = build_masking_tables(tok)
    assert tables.word_convention == kind.split(" (")[0]
    text = " ".join(training_text(40, seed=5))  # whitespace-separated words
    enc = tok(text, add_special_tokens=False)
    body, word_ids = enc["input_ids"][:200], enc.word_ids()[:200]
    assert len(set(word_ids)) < len(word_ids) - 10, "the text should hold multi-piece words"
    ids = torch.tensor([[tok.cls_token_id, *body, tok.sep_token_id]] * 4000)
    # The words masking sees: a piece starts a word unless the table says it continues the one before.
    ours = _word_start_positions(ids[:1], tables)[0, 1:-1].tolist()
    theirs = [word_ids.index(w) + 1 for w in word_ids]  # the row position of each piece's word's first piece
    assert ours == theirs
    _, labels = mask_tokens(ids, torch.arange(len(ids)), 0, MaskingSpec(whole_word_mask=True, seed=7), tables)
    selected = (labels != IGNORE_INDEX)[:, 1:-1]
    word = torch.tensor(word_ids)
    for w in word.unique():  # every word all or none, in every row
        cols = selected[:, word == w]
        assert torch.equal(cols.all(dim=1), cols.any(dim=1)), f"word {w} split"
    rate = selected.float().mean().item()
    assert abs(rate - 0.15) < 0.01, rate
    # Negative control: token-level masking does split multi-piece words.
    _, per_token = mask_tokens(ids, torch.arange(len(ids)), 0, MaskingSpec(seed=7), tables)
    sel = (per_token != IGNORE_INDEX)[:, 1:-1]
    multi = [w for w in word.unique() if (word == w).sum() > 1]
    assert any(not torch.equal(sel[:, word == w].all(1), sel[:, word == w].any(1)) for w in multi)


def test_a_vocabulary_without_word_marks_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlm.config import TrainConfig
    from mlm.train.engine import build_masking

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        training_text(), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        unk_token="[UNK]",
    )
    assert build_masking_tables(fast).word_convention is None
    with pytest.raises(UserError, match="--whole_word_mask needs a vocabulary that marks words .* train without"):
        build_masking(TrainConfig(whole_word_mask=True), fast)
    build_masking(TrainConfig(whole_word_mask=False), fast)  # token-level masking needs no word marks
