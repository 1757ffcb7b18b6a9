"""The base of the test pyramid: train_step, evaluate, fit and checkpoint save/load in this process, at world
size 1, with a tiny BERT (each test well under a second once the tokenizer is loaded). What needs several
processes (DDP equivalence, agreed stops, restarts) is tested under torchrun elsewhere."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_text_file, read_json, text_chunks, tiny_args, tiny_bert

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig, parse_args
from mlm.data.cached import ChunkDataset, eval_shard
from mlm.data.masking import IGNORE_INDEX
from mlm.train import checkpoint, engine, loop
from mlm.train.swa import WeightAverage

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


@pytest.fixture(scope="module")
def chunks(tokenizer, tmp_path_factory) -> ChunkDataset:
    return text_chunks(tokenizer, make_text_file(str(tmp_path_factory.mktemp("steps") / "t.txt"), n_lines=120, seed=5))


def parts(tokenizer, precision: str = "fp32", accumulation: int = 1):
    cfg = TrainConfig(learning_rate=1e-3, num_warmup_steps=0, gradient_accumulation_steps=accumulation)
    trainable = engine.build_trainable(cfg, tiny_bert(len(tokenizer)), precision, CPU, 10)
    trainable.loss.train()
    return trainable, engine.build_masking(cfg, tokenizer)


def batches(chunks, masking, rows: list[list[int]]) -> list[engine.Batch]:
    return [engine.prepare_batch(chunks.__getitems__(r), 0, masking, CPU) for r in rows]


# ---------------------------------------------------------------------- train_step
def test_accumulated_micro_batches_step_like_their_union(tokenizer, chunks):
    """Invariant 2 in one process: two micro-batches of 4 give the weights of one batch of 8 (the loss is the
    NLL over all masked tokens of the step divided once by their count, not a mean of micro-batch means)."""
    split, _ = parts(tokenizer)
    whole, masking = parts(tokenizer)
    a = engine.train_step(split, batches(chunks, masking, [[0, 1, 2, 3], [4, 5, 6, 7]]), ENV)
    b = engine.train_step(whole, batches(chunks, masking, [list(range(8))]), ENV)
    assert a.masked_tokens == b.masked_tokens > 0 and a.sequences == b.sequences == 8
    assert torch.allclose(a.loss_sum, b.loss_sum, atol=1e-4) and torch.allclose(a.grad_norm, b.grad_norm, atol=1e-5)
    for p, q in zip(split.loss.parameters(), whole.loss.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert int(a.skipped) == 0 and split.schedule.state_dict()["applied"] == 1


def test_a_step_moves_the_weights_and_masks_the_given_positions_only(tokenizer, chunks):
    trainable, masking = parts(tokenizer)
    before = [p.detach().clone() for p in trainable.loss.parameters()]
    [batch] = batches(chunks, masking, [[0, 1, 2, 3]])
    assert batch.positions.numel() == batch.targets.numel() >= batch.masked_count
    real = batch.positions[: batch.masked_count]  # then padding slots, ignored by the loss
    assert (batch.targets[batch.masked_count :] == IGNORE_INDEX).all()
    flat = batch.input_ids.view(-1)
    raw = chunks.__getitems__([0, 1, 2, 3])["input_ids"].view(-1)
    unmasked = torch.ones_like(flat, dtype=torch.bool)
    unmasked[real] = False
    assert torch.equal(flat[unmasked], raw[unmasked])  # only selected positions may change
    assert torch.equal(batch.targets[: batch.masked_count], raw[real])
    engine.train_step(trainable, [batch], ENV)
    assert any((a - b).abs().max() > 0 for a, b in zip(before, trainable.loss.parameters()))


# ---------------------------------------------------------------------- evaluate
def test_evaluation_is_the_same_for_any_batch_size(tokenizer, chunks):
    """Invariant 3 in one process: every example once, fixed masks, one division; batch sizes 3 and 16 agree
    with a token-by-token computation."""
    trainable, masking = parts(tokenizer)
    results = []
    for batch_size in (3, 16):
        loader = torch.utils.data.DataLoader(
            chunks, batch_size=batch_size, sampler=eval_shard(len(chunks), 0, 1), collate_fn=lambda b: b
        )
        results.append(engine.evaluate(trainable.loss, loader, ENV, masking, "fp32"))
    assert trainable.loss.training  # evaluate restores the mode it found
    assert results[0]["masked_tokens"] == results[1]["masked_tokens"] > 100
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-9)
    from mlm.data.masking import EVAL_EPOCH

    batch = engine.prepare_batch(chunks.__getitems__(list(range(len(chunks)))), EVAL_EPOCH, masking, CPU)
    with torch.no_grad():
        nll_sum = trainable.loss.eval()(batch.input_ids, batch.positions, batch.targets)
    assert batch.masked_count == results[0]["masked_tokens"]
    assert results[0]["loss"] == pytest.approx(float(nll_sum) / batch.masked_count, rel=1e-5)


# ---------------------------------------------------------------------- save / load
def test_save_and_load_round_trip_every_piece(tmp_path, tokenizer, chunks):
    """A checkpoint of weights, optimizer, schedule, scaler, RNG states and SWA loads back equal into fresh
    objects; a piece a checkpoint lacks (SWA before its start) is left as it is."""
    trainable, masking = parts(tokenizer)
    swa = WeightAverage(trainable.loss.model, start_step=1)
    for i in range(2):
        engine.train_step(trainable, batches(chunks, masking, [[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]]), ENV)
        swa.update(trainable.loss.model, i + 1)
    state = checkpoint.TrainState(step=2, epoch=0, micro_in_epoch=2, world_size=1, per_device_train_batch_size=4)
    torch.manual_seed(123)
    rngs = checkpoint.RankRngs(0, [checkpoint.rng_state()])
    expected_draw = torch.rand(3)
    path = checkpoint.save_checkpoint(
        str(tmp_path), state, trainable.loss.model, loop.checkpoint_parts(trainable, swa, rngs), save_total_limit=2
    )
    assert checkpoint.is_complete(path, verify_hashes=True)

    fresh, _ = parts(tokenizer)
    fresh_swa = WeightAverage(fresh.loss.model, start_step=1)
    loaded = checkpoint.TrainState(world_size=1, per_device_train_batch_size=4)
    checkpoint.load_checkpoint(
        path, loaded, fresh.loss.model, loop.checkpoint_parts(fresh, fresh_swa, checkpoint.RankRngs(0)), CPU
    )
    assert (loaded.step, loaded.micro_in_epoch) == (2, 2)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    for p, q in zip(trainable.loss.parameters(), fresh.loss.parameters()):
        assert torch.equal(p, q)
    a, b = trainable.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    assert (
        fresh.schedule.state_dict()["applied"] == 2 and fresh.schedule.get_last_lr() == trainable.schedule.get_last_lr()
    )
    assert fresh_swa.count == 2
    state.step = 3  # a checkpoint written before SWA started has no swa.pt
    early = checkpoint.save_checkpoint(
        str(tmp_path), state, trainable.loss.model, loop.checkpoint_parts(trainable, None, rngs), save_total_limit=2
    )
    assert not os.path.exists(os.path.join(early, "swa.pt"))
    untouched = WeightAverage(fresh.loss.model, start_step=5)
    checkpoint.load_checkpoint(
        early, loaded, fresh.loss.model, loop.checkpoint_parts(fresh, untouched, checkpoint.RankRngs(0)), CPU
    )
    assert untouched.count == 0 and loaded.step == 3


# ---------------------------------------------------------------------- fit
def test_fit_logs_evaluates_exports_and_saves(tmp_path, tiny_config_dir, tokenizer_path):
    """The whole loop at world size 1, built as train_ddp.py builds it: 4 steps, evaluation at 0, 2 and 4,
    checkpoints at 2 and 4, best/ and the history on disk."""
    import train_ddp
    from mlm.train.preemption import StopRequest

    train = make_text_file(str(tmp_path / "t.txt"), n_lines=150, seed=6)
    cfg = parse_args(
        tiny_args(
            tiny_config_dir,
            tokenizer_path,
            str(tmp_path / "out"),
            str(tmp_path / "cache"),
            train_file=train,
            max_train_steps=4,
            eval_steps=2,
        )
    )
    run = train_ddp.build_run(cfg, ENV, StopRequest(30.0))
    try:
        state = loop.fit(run)
    finally:
        run.tracker.close()
    assert state.step == 4 and state.best_step in (2, 4)
    history = read_json(str(tmp_path / "out" / "training_history.json"))
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in history if "eval" in h] == [0, 2, 4]
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["step-2", "step-4"]
    best = read_json(str(tmp_path / "out" / "best" / "eval_results.json"))
    assert best["step"] == state.best_step and best["masked_tokens"] > 0
    assert all(h["loss"] > 0 and 0 < h["mfu"] for h in history if "loss" in h)
    first_eval = [h for h in history if "eval" in h][0]["eval"]
    assert first_eval["masked_tokens"] == best["masked_tokens"]  # the same fixed evaluation masks each time
