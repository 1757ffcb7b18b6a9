"""The prediction core, mlm/fill_mask.py: parity with transformers' fill-mask pipeline, joint fills on a model
whose answers are known, batched == one by one, and the checks on inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FORCED_SENTENCES

from mlm.config import UserError
from mlm.inference.fill_mask import FillMask, Prediction

# 24 single-mask sentences: varied length, punctuation, numbers, capitals, a mask at the start and at the end.
PARITY_SENTENCES = [
    "The capital of France is [MASK].",
    "Learning a new language can be [MASK] but rewarding.",
    "[MASK] is the largest planet in the solar system.",
    "She poured a cup of [MASK] and opened the newspaper.",
    "The dog barked at the [MASK] all morning.",
    "In 1998, the company moved its headquarters to [MASK].",
    "He plays the [MASK] in a jazz band on weekends.",
    "The results of the experiment were [MASK] surprising.",
    "Please turn off the lights when you [MASK] the room.",
    "The river flows into the [MASK] near the old harbour.",
    "My favourite season of the year is [MASK].",
    "The museum is closed on [MASK] and public holidays.",
    "After the match, the players thanked the [MASK].",
    "Water boils at 100 degrees [MASK] at sea level.",
    "The novel was translated into more than [MASK] languages.",
    "A [MASK] a day keeps the doctor away.",
    "They built a small house near the [MASK] of the forest.",
    "The train to London leaves at [MASK] o'clock.",
    "Her speech was short, clear and [MASK].",
    "The album reached number one on the [MASK] charts.",
    "Scientists discovered a new species of [MASK] in the Amazon.",
    "The committee will announce its decision next [MASK].",
    "It was the best of times, it was the worst of [MASK].",
    "The band released their debut album in [MASK]",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> FillMask:
    return FillMask(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def forced(forced_model_dir) -> FillMask:
    return FillMask(forced_model_dir, device="cpu")


@pytest.fixture(scope="module")
def pipe(minilm_dir):
    from transformers import pipeline

    return pipeline("fill-mask", model=minilm_dir, device="cpu")


def assert_same_candidates(ours, theirs, tol=1e-5):
    assert [c.token_id for c in ours] == [t["token"] for t in theirs]  # same tokens, same order
    assert [c.token for c in ours] == [t["token_str"] for t in theirs]
    assert [c.sequence for c in ours] == [t["sequence"] for t in theirs]
    for c, t in zip(ours, theirs):
        assert abs(c.score - t["score"]) <= tol, (c, t)


# ---------------------------------------------------------------------- (a) parity with the pipeline
@pytest.mark.parametrize("top_k", [5, 10])
def test_single_masks_equal_the_hf_pipeline(minilm, pipe, top_k):
    assert len(PARITY_SENTENCES) >= 20
    preds = minilm.predict(PARITY_SENTENCES, top_k=top_k, batch_size=8)
    confident = 0
    for text, pred in zip(PARITY_SENTENCES, preds):
        theirs = pipe(text, top_k=top_k)
        assert len(pred.masks) == 1 and len(pred.masks[0].candidates) == top_k
        assert_same_candidates(pred.masks[0].candidates, theirs)
        confident += theirs[0]["score"] > 0.05
    # The comparison within 1e-5 means something only where probabilities are far from uniform (1/30522).
    assert confident >= len(PARITY_SENTENCES) // 2


def test_targets_equal_the_hf_pipeline(minilm, pipe):
    # "Paris" is not in the uncased vocabulary: both resolve it to its first token, "paris".
    targets = ["paris", "Paris", "london", "coffee", "tea", "water", "temper", "the"]
    for text in PARITY_SENTENCES[:6]:
        pred = minilm.predict(text, top_k=4, targets=targets)[0]
        assert_same_candidates(pred.masks[0].candidates, pipe(text, top_k=4, targets=targets))
        allowed = {"paris", "london", "coffee", "tea", "water", "temper", "the"}
        assert {c.token for c in pred.masks[0].candidates} <= allowed
        assert all(set(f.tokens) <= allowed for f in pred.fills)


def test_several_masks_per_mask_scores_equal_the_pipeline(minilm, pipe):
    text = "You are my [MASK] that shines my [MASK]."
    pred = minilm.predict(text)[0]
    theirs = pipe(text)
    assert len(pred.masks) == 2
    for mask, rows in zip(pred.masks, theirs):
        assert [c.token_id for c in mask.candidates] == [r["token"] for r in rows]
        assert all(abs(c.score - r["score"]) <= 1e-5 for c, r in zip(mask.candidates, rows))


# ---------------------------------------------------------------------- (b) joint fills
def test_joint_fills_find_the_forced_sentences(forced):
    sentence_a, sentence_b = FORCED_SENTENCES
    pred = forced.predict("[MASK] [MASK] a [MASK] [MASK] .", top_k=5)[0]
    fills = pred.fills
    assert len(fills) == 5
    # Every content word is masked, so the two sentences are about equally likely; the top two joint fills
    # are exactly them, far ahead of any mixture.
    assert {f.sequence for f in fills[:2]} == {sentence_a.replace(" .", "."), sentence_b.replace(" .", ".")}
    assert fills[1].score > 10 * fills[2].score
    for f in fills:
        assert len(f.token_ids) == 4 and "[MASK]" not in f.sequence and sorted(f.fill_order) == [0, 1, 2, 3]
    assert [f.score for f in fills] == sorted((f.score for f in fills), reverse=True)
    assert all(abs(f.score - math.exp(f.log_score)) < 1e-12 for f in fills)


def test_joint_fill_completes_a_partial_sentence(forced):
    pred = forced.predict("she [MASK] a [MASK] [MASK] .")[0]
    assert pred.fills[0].sequence == "she was a bad woman."
    assert pred.fills[0].tokens == ["was", "bad", "woman"]
    assert pred.fills[0].score > 0.5


def test_joint_fill_score_is_the_chain_of_conditional_probabilities(forced):
    """Recompute each fill's score by hand with the plain model: fill its masks in its fill order, each time
    checking that the mask filled was the most confident one, and multiply the probabilities."""
    text = "[MASK] [MASK] a [MASK] [MASK] ."
    pred = forced.predict(text, top_k=3)[0]
    ids0 = forced.tokenizer(text, return_tensors="pt")["input_ids"][0]
    positions = [m.position for m in pred.masks]
    assert positions == (ids0 == forced.mask_id).nonzero().flatten().tolist()
    for fill in pred.fills:
        ids, log_score = ids0.clone(), 0.0
        for step, k in enumerate(fill.fill_order):
            with torch.no_grad():
                probs = forced.model(input_ids=ids[None]).logits[0].softmax(-1)
            remaining = [p for p in positions if ids[p] == forced.mask_id]
            if step == 0:  # the first choice is the most confident mask of the input itself
                assert positions[k] == max(remaining, key=lambda p: float(probs[p].max()))
            log_score += math.log(float(probs[positions[k], fill.token_ids[k]]))
            ids[positions[k]] = fill.token_ids[k]
        assert abs(log_score - fill.log_score) < 1e-4, (fill, log_score)


def test_single_mask_fills_are_the_mask_candidates(minilm):
    pred = minilm.predict("The capital of France is [MASK].", top_k=5)[0]
    for cand, fill in zip(pred.masks[0].candidates, pred.fills):
        assert fill.token_ids == [cand.token_id] and fill.sequence == cand.sequence
        assert abs(fill.score - cand.score) < 1e-5


# ---------------------------------------------------------------------- (d) batched == one by one
def assert_same_prediction(a: Prediction, b: Prediction, tol: float = 1e-5) -> None:
    assert a.text == b.text and len(a.masks) == len(b.masks) and len(a.fills) == len(b.fills)
    for ma, mb in zip(a.masks, b.masks):
        assert ma.position == mb.position
        assert [(c.token_id, c.sequence) for c in ma.candidates] == [(c.token_id, c.sequence) for c in mb.candidates]
        assert all(abs(x.score - y.score) <= tol for x, y in zip(ma.candidates, mb.candidates))
    for fa, fb in zip(a.fills, b.fills):
        assert (fa.sequence, fa.token_ids, fa.fill_order) == (fb.sequence, fb.token_ids, fb.fill_order)
        assert abs(fa.score - fb.score) <= tol and abs(fa.log_score - fb.log_score) <= tol * abs(fa.log_score)


@pytest.mark.parametrize("batch_size", [3, 32])
def test_batched_equals_one_by_one(minilm, batch_size):
    texts = PARITY_SENTENCES[:9] + [
        "You are my [MASK] that shines my [MASK].",
        "He [MASK] [MASK] [MASK] a good man.",
        "The [MASK] of the [MASK] was played in [MASK] in 1998, before a crowd.",
    ]
    batched = minilm.predict(texts, batch_size=batch_size)
    alone = [minilm.predict([t], batch_size=1)[0] for t in texts]
    assert len(batched) == len(texts)
    for a, b in zip(batched, alone):
        assert_same_prediction(a, b)


def test_json_dict_round_trips(minilm):
    pred = minilm.predict("You are my [MASK] that shines my [MASK].")[0]
    assert Prediction.from_dict(pred.to_dict()) == pred
    pred.compare = minilm.predict("You are my [MASK] that shines my [MASK].")[0]
    assert Prediction.from_dict(pred.to_dict()) == pred


# ---------------------------------------------------------------------- inputs
def test_mask_spellings_are_translated(minilm):
    a = minilm.predict("The capital of France is [MASK].")[0]
    for spelling in ("<mask>", "[mask]", "<MASK>"):
        b = minilm.predict(f"The capital of France is {spelling}.")[0]
        assert [c.token_id for c in b.masks[0].candidates] == [c.token_id for c in a.masks[0].candidates]


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "The capital of France is Paris.",
            "input 2 ('The capital of France is Paris.') has no mask token; put [MASK]",
        ),
        ("   ", "input 2 is empty"),
        (
            "word " * 600 + "[MASK]",
            "input 2 ('word word word word word word word wo...') is 603 tokens long but the model reads at most 512",
        ),
    ],
)
def test_bad_inputs_raise_one_clear_error(minilm, text, problem):
    with pytest.raises(UserError) as e:
        minilm.predict(["A fine [MASK].", text])
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_a_mask_beyond_the_limit_is_never_cut_silently(forced):
    limit = forced.max_length  # the tiny config: 128 positions
    assert limit == 128
    ok = "he " * (limit - 3) + "[MASK]"  # [CLS] + 125 words + mask + [SEP] = 128
    assert len(forced.predict(ok)[0].masks) == 1
    with pytest.raises(UserError, match="129 tokens long but the model reads at most 128"):
        forced.predict("he " + ok)


def test_unknown_targets_are_an_error(forced):
    with pytest.raises(UserError, match="none of the words"):
        forced.predict("he [MASK] a good man .", targets=["zebra"])
