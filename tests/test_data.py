"""Acceptance (b): chunking, the on-disk cache, sources, line-by-line batches and exact eval sharding."""

import json
import os
import random

import numpy as np
import pytest
from helpers import SHARED_WIKITEXT, make_text_file

from mlm.config import TrainConfig, UserError
from mlm.data.cached import ChunkDataset, LineDataset, TokenStream, eval_shard, load_token_streams, tokenize_texts
from mlm.data.sources import read_text_file
from mlm.data.text import Framing


def cfg_for(tmp_path, **kw) -> TrainConfig:
    kw.setdefault("output_dir", str(tmp_path / "out"))
    return TrainConfig(**kw).resolve_and_validate()


def reference_stream(tokenizer, texts) -> list[int]:
    out = []
    for t in texts:
        out += tokenizer(t, add_special_tokens=False)["input_ids"]
    return out


def _texts_for_the_ascii_path() -> list[str]:
    """Every ASCII character (controls included), random ASCII, texts with non-ASCII characters, empty ones, and
    special and added tokens as written and as lowercased."""
    rng = random.Random(0)
    texts = ["".join(map(chr, range(128))), "", " ", "\t\x00\x7f", "Hello, World!  It's 3.14 (approx.)"]
    texts += ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    texts += ["".join(rng.choice("Ab cD,.!?'-") for _ in range(rng.randint(1, 30))) for _ in range(300)]
    texts += ["Café naïve RÉSUMÉ", "戦場のヴァルキュリア 3 : Unrecorded Chronicles", "ΣΑΣ σας", "x\u00a0y\u200bz"]
    texts += ["[MASK] [mask] [Mask]", "a [SEP] b [sep]", "<s> </s> <mask>", "FooBar foobar BaZ baz Baz"]
    texts += ["foobar alone", "baz alone", "[mask] alone", "a [sep]"]  # an added token only once normalised
    return texts


def _reference_ids(tokenizer, texts) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _with_normalizer(tokenizer, normalizer):
    tokenizer.backend_tokenizer.normalizer = normalizer
    return tokenizer


@pytest.mark.parametrize(
    "kind, fast_path",
    [
        ("bert uncased (MiniLM)", True),
        ("bert cased", True),
        ("NFD + Lowercase + StripAccents", True),
        ("NFKC, added tokens", True),
        ("byte-level BPE, no normaliser", False),
        ("Replace + NFKC (SentencePiece-like)", False),
    ],
)
def test_the_ascii_path_gives_the_fast_tokenizers_ids(kind, fast_path, tokenizer_path, tmp_path):
    """ASCII texts are normalised by a byte table and tokenised without the Rust normaliser where the normaliser
    acts a character at a time; the ids are the fast tokenizer's own, text by text, for every tokenizer kind."""
    from families import byte_level_bpe, trained_wordpiece, unigram_metaspace
    from tokenizers import AddedToken, normalizers
    from transformers import AutoTokenizer

    from mlm.data.text import TextEncoder, plain_backend

    d = str(tmp_path / "tok")
    if kind == "bert uncased (MiniLM)":
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    elif kind == "bert cased":
        tok = _with_normalizer(trained_wordpiece(d), normalizers.BertNormalizer(lowercase=False, strip_accents=False))
    elif kind == "NFD + Lowercase + StripAccents":
        tok = _with_normalizer(
            trained_wordpiece(d),
            normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]),
        )
    elif kind == "NFKC, added tokens":
        tok = _with_normalizer(
            unigram_metaspace(d), normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        )
        tok.add_tokens([AddedToken("FooBar", normalized=True), AddedToken("BaZ", normalized=False)])
    elif kind == "byte-level BPE, no normaliser":
        tok = byte_level_bpe(d)
    else:
        tok = _with_normalizer(
            unigram_metaspace(d), normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.NFKC()])
        )
    encoder = TextEncoder(plain_backend(tok))
    assert (encoder.ascii is not None) == fast_path
    texts = _texts_for_the_ascii_path()
    assert encoder.ids(texts) == _reference_ids(tok, texts)


def test_many_added_tokens_keep_the_normaliser(tokenizer_path):
    """Searching every ASCII text for more than 64 added tokens would cost more than the normaliser saves."""
    from transformers import AutoTokenizer

    from mlm.data.text import text_encoder

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.add_tokens([f"addedword{i}" for i in range(30)])  # 40 forms with the specials and their lowercase: fast
    assert text_encoder(tok).ascii is not None
    tok.add_tokens([f"addedword{i}" for i in range(30, 60)])  # 70: the copies are made again, without the path
    assert text_encoder(tok).ascii is None
    texts = _texts_for_the_ascii_path() + ["addedword3 and addedword45, AddedWord7"]
    assert text_encoder(tok).ids(texts) == _reference_ids(tok, texts)


def test_tokenised_stream_equals_per_text_tokenisation(tokenizer, text_file):
    texts = read_text_file(text_file)
    stream = tokenize_texts(tokenizer, texts)
    assert stream.tokens.tolist() == reference_stream(tokenizer, texts)
    assert stream.lengths.sum() == stream.tokens.size and len(stream.lengths) == len(texts)


@pytest.mark.parametrize("seq", [16, 32, 128])
def test_chunks_are_exact_framed_and_lose_only_the_remainder(tokenizer, text_file, seq):
    stream = tokenize_texts(tokenizer, read_text_file(text_file))
    ds = ChunkDataset(stream, seq, tokenizer.cls_token_id, tokenizer.sep_token_id)
    batch = ds.__getitems__(list(range(len(ds))))["input_ids"].numpy()
    assert batch.shape == (len(ds), seq)
    assert (batch[:, 0] == tokenizer.cls_token_id).all() and (batch[:, -1] == tokenizer.sep_token_id).all()
    joined = batch[:, 1:-1].reshape(-1)
    assert joined.tolist() == stream.tokens[: joined.size].tolist()  # nothing reordered or lost ...
    assert stream.tokens.size - joined.size == ds.dropped_tokens < seq - 2  # ... but the final remainder
    # Batches fetched in any order hold the same rows.
    idx = [5, 0, 3]
    assert (ds.__getitems__(idx)["input_ids"].numpy() == batch[idx]).all()


def test_wikitext_chunking_on_real_data(tokenizer, tmp_path):
    if not os.path.isdir(SHARED_WIKITEXT):
        pytest.skip("../shared WikiText-2 is not beside this checkout")
    cfg = cfg_for(tmp_path, dataset_dir=SHARED_WIKITEXT, tokenizer_name=None)
    streams, hit, _ = load_token_streams(cfg, tokenizer, str(tmp_path / "cache"))
    assert not hit and streams["train"].tokens.size > 2_000_000
    ds = ChunkDataset(streams["train"], 128, tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert len(ds) == streams["train"].tokens.size // 126
    assert ds.bodies.reshape(-1).tolist() == streams["train"].tokens[: len(ds) * 126].tolist()
    # The real text, ASCII path and all, tokenises as the fast tokenizer does it text by text.
    texts = read_text_file(os.path.join(SHARED_WIKITEXT, "wiki.valid.raw"))
    assert streams["validation"].tokens.tolist() == reference_stream(tokenizer, texts)


def test_second_build_is_served_from_the_cache(tokenizer, text_file, tmp_path):
    cfg = cfg_for(tmp_path, train_file=text_file, validation_split_percentage=10)
    calls = []

    def builder(tok, texts):
        calls.append(len(texts))
        return tokenize_texts(tok, texts)

    first, hit1, _ = load_token_streams(cfg, tokenizer, str(tmp_path / "cache"), builder=builder)
    assert not hit1 and sum(calls) == len(read_text_file(text_file))  # every text tokenised once

    def must_not_build(tok, texts):
        raise AssertionError("the builder ran although the cache holds this data")

    second, hit2, _ = load_token_streams(cfg, tokenizer, str(tmp_path / "cache"), builder=must_not_build)
    assert hit2
    for split in ("train", "validation"):
        assert np.array_equal(first[split].tokens, second[split].tokens)
    # Another source (other content) misses the cache.
    other = make_text_file(str(tmp_path / "other.txt"), n_lines=50, seed=9)
    _, hit3, _ = load_token_streams(
        cfg_for(tmp_path, train_file=other), tokenizer, str(tmp_path / "cache"), builder=builder
    )
    assert not hit3


def test_validation_is_carved_from_the_first_rows(tokenizer, text_file, tmp_path):
    cfg = cfg_for(tmp_path, train_file=text_file, validation_split_percentage=10)
    streams, _, _ = load_token_streams(cfg, tokenizer, str(tmp_path / "cache"))
    texts = read_text_file(text_file)
    n_val = len(texts) // 10
    assert streams["validation"].tokens.tolist() == reference_stream(tokenizer, texts[:n_val])
    assert streams["train"].tokens.tolist() == reference_stream(tokenizer, texts[n_val:])
    with pytest.raises(UserError, match="no validation split"):
        load_token_streams(
            cfg_for(tmp_path, train_file=text_file, validation_split_percentage=0), tokenizer, str(tmp_path / "cache2")
        )


def test_local_formats_read_the_text_column(tmp_path):
    rows = ["first text", "second one", "third"]
    with open(tmp_path / "a.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows))
    with open(tmp_path / "a.csv", "w") as fh:
        fh.write("id,text\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rows)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        assert read_text_file(str(tmp_path / name)) == rows
    with open(tmp_path / "b.jsonl", "w") as fh:
        fh.write(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' column"):
        read_text_file(str(tmp_path / "b.jsonl"))


def test_line_by_line_pads_to_a_multiple_of_8(tokenizer):
    lengths = np.array([3, 0, 10, 40])
    stream = TokenStream(np.arange(1000, 1000 + lengths.sum(), dtype=np.int32), lengths)
    ds = LineDataset(stream, 32, Framing(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id))
    assert len(ds) == 3  # the empty text is skipped
    b = ds.__getitems__([0, 1])
    ids, attn = b["input_ids"].numpy(), b["attention_mask"].numpy()
    assert ids.shape == (2, 16)  # longest is 10 + 2 specials = 12 -> 16
    assert ids[0, :5].tolist() == [tokenizer.cls_token_id, 1000, 1001, 1002, tokenizer.sep_token_id]
    assert (ids[0, 5:] == tokenizer.pad_token_id).all() and attn[0].tolist() == [1] * 5 + [0] * 11
    long = ds.__getitems__([2])["input_ids"].numpy()
    assert long.shape == (1, 32) and long[0, -1] == tokenizer.sep_token_id  # truncated to max_seq_length


@pytest.mark.parametrize("n", [0, 1, 7, 100, 101])
def test_eval_shards_cover_every_example_once(n):
    for world in (1, 2, 3, 4):
        seen = [i for r in range(world) for i in eval_shard(n, r, world)]
        assert seen == list(range(n))
