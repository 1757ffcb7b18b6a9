"""Fixed shapes for the whole training micro-step (issue 34 a): the masked positions are padded to a capacity
fixed by the batch shape, the padding slots weigh nothing, so the loss and its gradients are today's, and the
compiled training forward (encoder, head, loss) is never recompiled as the masked count changes."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
from helpers import free_port, make_text_file, tiny_bert

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import ChunkDataset, tokenize_texts
from mlm.data.masking import IGNORE_INDEX, MaskingSpec, mask_tokens, masked_capacity, masked_slots
from mlm.train import engine

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
ROWS, LENGTH = 8, 32


def text_chunks(tokenizer, directory: str, length: int = LENGTH) -> ChunkDataset:
    path = make_text_file(os.path.join(directory, "t.txt"), n_lines=600, seed=3)
    with open(path, encoding="utf-8") as fh:
        stream = tokenize_texts(tokenizer, fh.read().split("\n"))
    return ChunkDataset(stream, length, tokenizer.cls_token_id, tokenizer.sep_token_id)


@pytest.fixture(scope="module")
def chunks(tokenizer, tmp_path_factory) -> ChunkDataset:
    return text_chunks(tokenizer, str(tmp_path_factory.mktemp("fixed-shapes")))


def unpadded(batch: engine.Batch) -> engine.Batch:
    """The batch as the path before fixed shapes had it: the masked positions only."""
    m = batch.masked_count
    return dataclasses.replace(batch, positions=batch.positions[:m], targets=batch.targets[:m])


def loss_and_grads(wrapped: torch.nn.Module, batch: engine.Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    wrapped.zero_grad(set_to_none=True)
    nll = wrapped(batch.input_ids, batch.positions, batch.targets, batch.attention_mask)
    nll.backward()
    return nll.detach(), [p.grad.clone() for p in wrapped.parameters()]


def assert_same(a: tuple, b: tuple, rel: float = 1e-6) -> None:
    (nll_a, grads_a), (nll_b, grads_b) = a, b
    assert torch.allclose(nll_a, nll_b, rtol=rel, atol=0), (float(nll_a), float(nll_b))
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=rel, atol=rel * float(gb.abs().max())), float((ga - gb).abs().max())


# ---------------------------------------------------------------------- the capacity
@pytest.mark.parametrize("probability,whole_word", [(0.15, False), (0.3, False), (0.15, True), (0.3, True)])
def test_the_capacity_holds_the_masked_tokens_of_real_batches(tokenizer, chunks, probability, whole_word):
    """Over every batch of two epochs' masks, the capacity (a multiple of 8, below the batch's tokens) holds the
    masked tokens: the overflow path is for bad luck, not for every run."""
    from mlm.data.masking import build_masking_tables

    spec = MaskingSpec(mlm_probability=probability, whole_word_mask=whole_word, seed=1)
    tables = build_masking_tables(tokenizer)
    capacity = masked_capacity(ROWS, LENGTH, spec)
    assert capacity % 8 == 0 and probability * ROWS * LENGTH < capacity < ROWS * LENGTH
    counts = []
    for epoch in range(2):
        for start in range(0, len(chunks) - ROWS + 1, ROWS):
            raw = chunks.__getitems__(list(range(start, start + ROWS)))
            _, labels = mask_tokens(raw["input_ids"], raw["index"], epoch, spec, tables)
            counts.append(int((labels != IGNORE_INDEX).sum()))
    assert len(counts) > 50 and len(set(counts)) > 5  # the masked count does vary from batch to batch
    assert max(counts) <= capacity


def test_a_batch_above_the_capacity_gets_doubled_slots_never_more_than_its_tokens():
    assert masked_slots(10, 16, 256) == 16
    assert masked_slots(17, 16, 256) == 32
    assert masked_slots(100, 16, 256) == 128
    assert masked_slots(250, 16, 256) == 256
    assert masked_slots(0, 16, 256) == 16


def test_padding_slots_point_at_a_real_row_and_are_ignored(tokenizer, chunks):
    masking = engine.build_masking(TrainConfig(), tokenizer)
    batch = engine.prepare_batch(chunks.__getitems__(list(range(ROWS))), 0, masking, CPU)
    capacity = masked_capacity(ROWS, LENGTH, masking.spec)
    assert batch.positions.shape == batch.targets.shape == (capacity,) and batch.masked_count < capacity
    assert (batch.targets[batch.masked_count :] == IGNORE_INDEX).all()
    assert (batch.targets[: batch.masked_count] != IGNORE_INDEX).all()
    assert int(batch.positions.max()) < ROWS * LENGTH


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_padded_loss_and_gradients_equal_the_masked_positions_only(tokenizer, chunks, label_smoothing):
    """In fp32, within 1e-6 relative: the padding slots change neither the loss nor any gradient."""
    masking = engine.build_masking(TrainConfig(), tokenizer)
    batch = engine.prepare_batch(chunks.__getitems__(list(range(ROWS))), 0, masking, CPU)
    assert batch.positions.numel() > batch.masked_count
    cfg = TrainConfig(label_smoothing=label_smoothing)
    loss = engine.build_trainable(cfg, tiny_bert(len(tokenizer)), "fp32", CPU, 10).loss.train()
    assert_same(loss_and_grads(loss, batch), loss_and_grads(loss, unpadded(batch)))


def test_a_batch_above_the_capacity_trains_exactly(tokenizer, chunks, monkeypatch):
    """The overflow path: with a capacity far below the masked count, the slots grow and the step equals the
    masked-positions-only step."""
    masking = engine.build_masking(TrainConfig(), tokenizer)
    monkeypatch.setattr(engine, "masked_capacity", lambda rows, length, spec: 8)
    batch = engine.prepare_batch(chunks.__getitems__(list(range(ROWS))), 0, masking, CPU)
    assert batch.masked_count > 8 and batch.positions.numel() == masked_slots(batch.masked_count, 8, ROWS * LENGTH)
    loss = engine.build_trainable(TrainConfig(), tiny_bert(len(tokenizer)), "fp32", CPU, 10).loss.train()
    assert_same(loss_and_grads(loss, batch), loss_and_grads(loss, unpadded(batch)))


def _two_ranks(rank: int, port: int, tokenizer_path: str, chunk_dir: str, results) -> None:
    """One rank of the 2-rank comparison: DDP gradients of the padded batch and of the unpadded one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        data = text_chunks(tokenizer, chunk_dir)
        masking = engine.build_masking(TrainConfig(), tokenizer)
        rows = list(range(rank * ROWS, (rank + 1) * ROWS))
        batch = engine.prepare_batch(data.__getitems__(rows), 0, masking, CPU)
        loss = engine.build_trainable(TrainConfig(), tiny_bert(len(tokenizer)), "fp32", CPU, 10).loss.train()
        wrapped = DDP(loss)
        padded, plain = loss_and_grads(wrapped, batch), loss_and_grads(wrapped, unpadded(batch))
        assert_same(padded, plain)
        results.put((rank, batch.positions.numel() > batch.masked_count))
    finally:
        dist.destroy_process_group()


def test_padded_gradients_equal_the_masked_positions_only_on_two_ranks(tokenizer_path, tmp_path):
    """Under DDP on 2 gloo ranks (two spawned interpreters): the averaged gradients match too."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.spawn(_two_ranks, args=(free_port(), tokenizer_path, str(tmp_path), results), nprocs=2, join=True)
    assert sorted(results.get(timeout=5) for _ in range(2)) == [(0, True), (1, True)]


# ---------------------------------------------------------------------- no recompilation
def compiled_steps(tokenizer, chunks, monkeypatch, steps: int = 50) -> tuple[list[int], list[int]]:
    """`steps` compiled training steps (a counting backend stands in for inductor: dynamo's graphs are what is
    counted); returns (masked count per step, graphs compiled so far after each step)."""
    compiled: list[int] = []

    def counting_backend(graph, example_inputs):
        compiled.append(1)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend=counting_backend))
    torch.compiler.reset()  # forget what earlier tests compiled
    cfg = TrainConfig(torch_compile=True, learning_rate=1e-3, num_warmup_steps=0)
    trainable = engine.build_trainable(cfg, tiny_bert(len(tokenizer)), "fp32", CPU, steps)
    trainable.loss.train()
    masking = engine.build_masking(cfg, tokenizer)
    counts, after = [], []
    for step in range(steps):
        start = (step * ROWS) % (len(chunks) - ROWS)
        batch = engine.prepare_batch(chunks.__getitems__(list(range(start, start + ROWS))), step, masking, CPU)
        engine.train_step(trainable, [batch], ENV)
        counts.append(batch.masked_count)
        after.append(len(compiled))
    return counts, after


def test_the_compiled_step_is_not_recompiled_as_the_masked_count_changes(tokenizer, chunks, monkeypatch):
    counts, after = compiled_steps(tokenizer, chunks, monkeypatch)
    assert len(set(counts)) > 10  # 50 steps of varying masked counts
    assert after[0] >= 1 and after[-1] == after[0], f"graphs compiled after each step: {after}"


def test_without_the_fixed_capacity_the_step_would_recompile(tokenizer, chunks, monkeypatch):
    """The check above can fail: with the slots cut to the masked count (the path before), dynamo compiles again."""
    monkeypatch.setattr(engine, "masked_slots", lambda count, capacity, tokens: count)
    _, after = compiled_steps(tokenizer, chunks, monkeypatch, steps=6)
    assert after[-1] > after[0]


# ---------------------------------------------------------------------- capture (issue 34 b, the CPU side)
@pytest.mark.parametrize("mode, captured", [("default", False), ("reduce-overhead", True), ("max-autotune", True)])
def test_the_compile_mode_reaches_torch_compile_and_a_capturing_mode_marks_each_step(
    tokenizer, chunks, monkeypatch, mode, captured
):
    """What a GPU run would do, seen on the CPU: torch.compile gets the mode, and with a mode that captures CUDA
    graphs every training forward starts a new step of replays (torch.compiler.cudagraph_mark_step_begin), so a
    replay never overwrites outputs the step still needs."""
    seen, marks = [], []
    real_compile = torch.compile

    def compile_spy(fn, **kwargs):
        seen.append(kwargs.get("mode"))
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_spy)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = TrainConfig(torch_compile=True, torch_compile_mode=mode, learning_rate=1e-3, num_warmup_steps=0)
    trainable = engine.build_trainable(cfg, tiny_bert(len(tokenizer)), "fp32", CPU, 3)
    trainable.loss.train()
    masking = engine.build_masking(cfg, tokenizer)
    micro = [engine.prepare_batch(chunks.__getitems__(list(range(i * 4, i * 4 + 4))), 0, masking, CPU) for i in (0, 1)]
    engine.train_step(trainable, micro, ENV)  # two micro-batches: two forwards
    assert seen == [mode]
    assert len(marks) == (2 if captured else 0)


def test_a_compile_mode_without_torch_compile_is_one_line():
    from mlm.common.cli import UserError
    from mlm.config import parse_args

    with pytest.raises(UserError, match="--torch_compile_mode reduce-overhead applies to --torch_compile"):
        parse_args(["--torch_compile_mode", "reduce-overhead"])
