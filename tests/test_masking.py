"""Acceptance (a): the 80/10/10 masking statistics, determinism and whole-word masking."""

import pytest
import torch

from mlm.data.masking import EVAL_EPOCH, IGNORE_INDEX, MaskingSpec, build_masking_tables, mask_tokens, token_hashes

SPEC = MaskingSpec(mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1, seed=1234)


@pytest.fixture(scope="module")
def tables(tokenizer):
    return build_masking_tables(tokenizer)


def synthetic_batch(tokenizer, tables, rows=9600, length=128, seed=0):
    """Ordinary tokens framed by [CLS]/[SEP], with padding after [SEP] in every third row."""
    g = torch.Generator().manual_seed(seed)
    ids = tables.ordinary_ids[torch.randint(len(tables.ordinary_ids), (rows, length), generator=g)]
    ids[:, 0] = tokenizer.cls_token_id
    ends = torch.full((rows,), length - 1)
    ends[::3] = torch.randint(10, length - 1, (len(ends[::3]),), generator=g)
    pos = torch.arange(length)[None, :]
    ids[pos == ends[:, None]] = tokenizer.sep_token_id
    ids[pos > ends[:, None]] = tokenizer.pad_token_id
    return ids


def test_statistics_over_a_million_tokens(tokenizer, tables):
    ids = synthetic_batch(tokenizer, tables)
    masked, labels = mask_tokens(ids, torch.arange(len(ids)), 0, SPEC, tables)
    maskable = ~tables.special[ids]
    assert int(maskable.sum()) >= 1_000_000
    selected = labels != IGNORE_INDEX
    assert not (selected & ~maskable).any(), "a special or padding token was selected"
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) <= 0.003, rate
    n = selected.sum().item()
    as_mask = (masked[selected] == tokenizer.mask_token_id).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    random = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) <= 0.01 and abs(random - 0.1) <= 0.01 and abs(unchanged - 0.1) <= 0.01, (
        as_mask,
        random,
        unchanged,
    )
    # Unselected tokens are untouched; random replacements are ordinary tokens, never special ones.
    assert torch.equal(masked[~selected], ids[~selected])
    replaced = selected & (masked != ids) & (masked != tokenizer.mask_token_id)
    assert not tables.special[masked[replaced]].any()
    assert len(set(masked[replaced].tolist())) > 1000, "random replacements should spread over the vocabulary"


def test_configurable_proportions(tokenizer, tables):
    ids = synthetic_batch(tokenizer, tables, rows=2000)
    spec = MaskingSpec(mlm_probability=0.3, mask_replace_prob=0.5, random_replace_prob=0.5, seed=7)
    masked, labels = mask_tokens(ids, torch.arange(len(ids)), 3, spec, tables)
    selected = labels != IGNORE_INDEX
    rate = selected.sum().item() / (~tables.special[ids]).sum().item()
    assert abs(rate - 0.3) < 0.005
    as_mask = (masked[selected] == tokenizer.mask_token_id).float().mean().item()
    assert abs(as_mask - 0.5) < 0.01
    assert (masked[selected] == ids[selected]).float().mean().item() < 0.001  # nothing left unchanged


def test_masks_are_a_pure_function_of_seed_epoch_index_position(tokenizer, tables):
    ids = synthetic_batch(tokenizer, tables, rows=64)
    index = torch.arange(1000, 1064)
    whole, whole_labels = mask_tokens(ids, index, 2, SPEC, tables)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    for part in perm.split(5):  # the same examples in other batches, other order, other batch sizes
        m, lab = mask_tokens(ids[part], index[part], 2, SPEC, tables)
        assert torch.equal(m, whole[part]) and torch.equal(lab, whole_labels[part])
    other_epoch, other_labels = mask_tokens(ids, index, 3, SPEC, tables)
    assert (other_labels != whole_labels).float().mean() > 0.1
    other_index, _ = mask_tokens(ids, index + 1, 2, SPEC, tables)
    assert not torch.equal(other_index, whole)
    evals = [mask_tokens(ids, index, EVAL_EPOCH, SPEC, tables)[1] for _ in range(2)]
    assert torch.equal(*evals) and not torch.equal(evals[0], whole_labels)


def test_hash_is_uniform_enough():
    h = token_hashes(0, 0, torch.arange(4096), 256, 1)
    assert h.min() >= 0 and h.max() < 2**32
    u = (h >> 8).float() / 2**24
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.all((counts - 0.1).abs() < 0.003), counts


def test_whole_word_mask_never_splits_a_word(tokenizer, tables):
    text = " ".join(["unbelievable extraordinary tomorrow's photosynthesis antidisestablishmentarianism cat"] * 20)
    body = tokenizer(text, add_special_tokens=False)["input_ids"][:126]
    ids = torch.tensor([[tokenizer.cls_token_id, *body, tokenizer.sep_token_id]] * 3000)
    spec = MaskingSpec(whole_word_mask=True, seed=3)
    _, labels = mask_tokens(ids, torch.arange(len(ids)), 0, spec, tables)
    selected = labels != IGNORE_INDEX
    pieces = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    continuation = torch.tensor([p.startswith("##") for p in pieces])
    assert continuation.sum() > 20, "the text should hold multi-piece words"
    # A continuation piece is selected exactly when the piece before it (same word) is.
    prev = selected[:, :-1][:, continuation[1:]]
    cur = selected[:, 1:][:, continuation[1:]]
    assert torch.equal(prev, cur)
    rate = selected[:, 1:-1].float().mean().item()
    assert 0.1 < rate < 0.2, rate
    _, per_token = mask_tokens(ids, torch.arange(len(ids)), 0, MaskingSpec(seed=3), tables)
    split = (per_token != IGNORE_INDEX)[:, 1:][:, continuation[1:]] != (per_token != IGNORE_INDEX)[:, :-1][
        :, continuation[1:]
    ]
    assert split.any(), "without whole-word masking words do get split (so the check above can fail)"
