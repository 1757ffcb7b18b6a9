"""Small random models of each encoder family, saved as pretrained directories, each with a tokenizer of its own
kind: the MiniLM WordPiece vocabulary, or one trained here with the `tokenizers` library (byte-level BPE as
RoBERTa and ModernBERT ship, Unigram with Metaspace as DeBERTa-v3, XLM-R and ALBERT ship).

No pretrained weights of these families are reachable offline; what the tests check (the head at masked
positions, DDP, resume, export) is a property of the architecture and the tokenizer kind, not of the weights."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from helpers import WORDS, minilm_path

# Dropout off everywhere: the equivalence tests compare runs, so forward passes must be pure.
_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Longer words than WORDS alone, so that a small vocabulary splits some of them into several pieces.
_EXTRA = (
    "photosynthesis thermodynamics counterintuitive misunderstanding internationalisation "
    "electroencephalography unpredictable reconsideration"
).split()


def training_text(n_lines: int = 600, seed: int = 0) -> list[str]:
    """A few KB of whitespace-separated words: what the tokenizers are trained on."""
    rng = random.Random(seed)
    vocab = list(WORDS) + _EXTRA
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 20))) + " ." for _ in range(n_lines)]


def _wrap(tok, cls: str, sep: str, pad: str, mask: str, unk: str, directory: str, **extra):
    """A transformers fast tokenizer around a `tokenizers` Tokenizer, [CLS] text [SEP] framing, saved."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=cls,
        sep_token=sep,
        pad_token=pad,
        mask_token=mask,
        unk_token=unk,
        model_max_length=512,
        **extra,
    )
    fast.save_pretrained(directory)
    return fast


def byte_level_bpe(directory: str, specials=("<s>", "</s>", "<pad>", "<mask>", "<unk>"), vocab_size: int = 400):
    """A byte-level BPE tokenizer as RoBERTa ships (Ġ marks a word start); specials in (cls, sep, pad, mask,
    unk) order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cls, sep, pad, mask, unk = specials
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[cls, pad, sep, unk, mask],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    return _wrap(tok, cls, sep, pad, mask, unk, directory)


def unigram_metaspace(directory: str, specials=("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"), vocab_size: int = 150):
    """A SentencePiece-style Unigram tokenizer with Metaspace, as DeBERTa-v3 ships (▁ marks a word start)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cls, sep, pad, mask, unk = specials
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[pad, cls, sep, unk, mask], unk_token=unk, show_progress=False
    )
    tok.train_from_iterator(training_text(), trainer)
    return _wrap(tok, cls, sep, pad, mask, unk, directory)


def trained_wordpiece(directory: str, vocab_size: int = 200):
    """A WordPiece tokenizer trained here, as BERT's is built ("##" marks a piece that continues a word)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    cls, sep, pad, mask, unk = SPECIALS[2], SPECIALS[3], SPECIALS[0], SPECIALS[4], SPECIALS[1]
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return _wrap(tok, cls, sep, pad, mask, unk, directory)


def wordpiece(directory: str):
    """The MiniLM (bert-base-uncased) WordPiece tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(directory)
    return tok


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)


def _bert(tok):
    from transformers import BertConfig

    return BertConfig(**_ids(tok), **_SIZE, **_NO_DROPOUT, max_position_embeddings=128)


def _distilbert(tok):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        **_ids(tok),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=128,
    )


def _roberta_like(config_class):
    def build(tok):
        return config_class(
            **_ids(tok),
            **_SIZE,
            **_NO_DROPOUT,
            max_position_embeddings=128 + tok.pad_token_id + 1,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            type_vocab_size=1,
        )

    return build


def _electra(tok):
    from transformers import ElectraConfig

    return ElectraConfig(**_ids(tok), **_SIZE, **_NO_DROPOUT, embedding_size=16, max_position_embeddings=128)


def _albert(tok):
    from transformers import AlbertConfig

    return AlbertConfig(
        **_ids(tok),
        **_SIZE,
        **_NO_DROPOUT,
        embedding_size=16,
        max_position_embeddings=128,
        classifier_dropout_prob=0.0,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )


def _modernbert(tok):
    from transformers import ModernBertConfig

    return ModernBertConfig(
        **_ids(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        local_attention=16,
        global_attn_every_n_layers=2,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )


def _deberta_v2(legacy: bool):
    def build(tok):
        from transformers import DebertaV2Config

        return DebertaV2Config(
            **_ids(tok),
            **_SIZE,
            **_NO_DROPOUT,
            max_position_embeddings=128,
            relative_attention=True,
            position_buckets=16,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            legacy=legacy,
        )

    return build


def _deberta_v1(tok):
    from transformers import DebertaConfig

    return DebertaConfig(
        **_ids(tok),
        **_SIZE,
        **_NO_DROPOUT,
        max_position_embeddings=128,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
    )


def _roberta(tok):
    from transformers import RobertaConfig

    return _roberta_like(RobertaConfig)(tok)


def _xlmr(tok):
    from transformers import XLMRobertaConfig

    return _roberta_like(XLMRobertaConfig)(tok)


# name -> (tokenizer builder, config builder). deberta-v3 is the DeBERTa-v3 layout (legacy head, as its
# checkpoints load); deberta-v3-lm-predictions the non-legacy head; deberta is v1 (byte-level BPE, as it ships).
FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "bert": (wordpiece, _bert),
    "distilbert": (wordpiece, _distilbert),
    "roberta": (byte_level_bpe, _roberta),
    "xlm-roberta": (lambda d: unigram_metaspace(d, ("<s>", "</s>", "<pad>", "<mask>", "<unk>")), _xlmr),
    "electra": (wordpiece, _electra),
    "albert": (unigram_metaspace, _albert),
    "modernbert": (lambda d: byte_level_bpe(d, ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")), _modernbert),
    "deberta-v3": (unigram_metaspace, _deberta_v2(legacy=True)),
    "deberta-v3-lm-predictions": (unigram_metaspace, _deberta_v2(legacy=False)),
    "deberta": (lambda d: byte_level_bpe(d, ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")), _deberta_v1),
}


def save_family(name: str, directory: str, seed: int = 0, **config_overrides) -> str:
    """A random masked LM of the family, with its tokenizer, saved as a pretrained directory."""
    import torch
    from transformers import AutoModelForMaskedLM

    make_tokenizer, make_config = FAMILIES[name]
    os.makedirs(directory, exist_ok=True)
    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = make_config(tok)
    config.update(config_overrides)
    model = AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(directory)
    return directory
