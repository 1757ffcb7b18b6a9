"""Issue 8 (a, b, c): layer-wise LR decay, label smoothing, stochastic weight averaging."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BERT, make_text_file, read_json, run_train, tiny_args

from mlm.config import TrainConfig
from mlm.data.masking import IGNORE_INDEX
from mlm.model.modeling import MaskedLMLoss, masked_positions
from mlm.train.optim import build_optimizer, build_scheduler
from mlm.train.swa import WeightAverage


def tiny_model(seed: int = 0, vocab: int = 120):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, **TINY_BERT))


# ---------------------------------------------------------------------- (a) layer-wise LR decay
def test_layerwise_lr_decay_groups_have_the_hand_computed_rates():
    model = tiny_model()  # 2 encoder layers
    cfg = TrainConfig(learning_rate=1e-3, layerwise_lr_decay=0.5, weight_decay=0.01)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    lr_of = {name: g["lr"] for g in opt.param_groups for name in g["names"]}
    # head 1e-3; layer 1: 1e-3 * 0.5; layer 0: 1e-3 * 0.25; embeddings 1e-3 * 0.125
    expected = {
        "cls.predictions.bias": 1e-3,
        "cls.predictions.transform.dense.weight": 1e-3,
        "bert.encoder.layer.1.attention.self.query.weight": 5e-4,
        "bert.encoder.layer.1.output.LayerNorm.weight": 5e-4,
        "bert.encoder.layer.0.intermediate.dense.bias": 2.5e-4,
        "bert.embeddings.word_embeddings.weight": 1.25e-4,
        "bert.embeddings.LayerNorm.bias": 1.25e-4,
    }
    for name, lr in expected.items():
        assert lr_of[name] == pytest.approx(lr, rel=1e-12), name
    # Every parameter in exactly one group; weight decay still only on weight matrices and embeddings.
    assert sorted(lr_of) == sorted(n for n, _ in model.named_parameters())
    wd_of = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    assert wd_of["bert.encoder.layer.1.attention.self.query.weight"] == 0.01
    assert wd_of["bert.encoder.layer.1.output.LayerNorm.weight"] == 0.0 == wd_of["cls.predictions.bias"]
    # The schedule scales each group from its own rate: halfway through a linear decay, each is half.
    sched = build_scheduler(TrainConfig(learning_rate=1e-3, num_warmup_steps=0), opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    # (the schedule keeps each rate as a float32 device tensor, hence the tolerance)
    assert {round(lr / 0.5 / 1.25e-4, 5) for lr in sched.get_last_lr()} == {1, 2, 4, 8}


def test_without_layerwise_decay_every_group_has_the_base_rate():
    opt = build_optimizer(TrainConfig(learning_rate=3e-4), tiny_model(), torch.device("cpu"))
    assert len(opt.param_groups) == 2 and {g["lr"] for g in opt.param_groups} == {3e-4}


# ---------------------------------------------------------------------- (b) label smoothing
def masked_batch(vocab: int = 120, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 16), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    pick = torch.rand(ids.shape, generator=g) < 0.3
    labels[pick] = ids[pick]
    return ids, labels


def test_label_smoothing_changes_the_training_loss_only():
    model = tiny_model()
    with torch.no_grad():  # a confident head: at initialisation every prediction is near uniform
        model.cls.predictions.transform.LayerNorm.weight.mul_(30.0)
    ids, labels = masked_batch()
    plain, smooth = MaskedLMLoss(model), MaskedLMLoss(model, label_smoothing=0.2)
    plain.train(), smooth.train()
    positions, target = masked_positions(labels)
    with torch.no_grad():
        logits = plain.masked_logits(ids, positions)
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, target[:, None]).sum()
        by_hand = 0.8 * nll + 0.2 * (-logp.mean(dim=-1)).sum()  # (1 - e) NLL + e * uniform cross-entropy
        assert torch.allclose(plain(ids, positions, target), nll, atol=1e-4)
        assert torch.allclose(smooth(ids, positions, target), by_hand, atol=1e-4)
        assert abs(smooth(ids, positions, target) - plain(ids, positions, target)) > 1.0
    # Evaluation is the plain NLL whatever the smoothing.
    assert torch.equal(plain.eval_nll(ids, positions, target)[0], smooth.eval_nll(ids, positions, target)[0])
    assert torch.allclose(smooth.eval_nll(ids, positions, target)[0], nll.double(), atol=1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_text_file(str(d / "train.txt"), n_lines=300, seed=1), make_text_file(
        str(d / "valid.txt"), n_lines=60, seed=2
    )


def history(out: str) -> tuple[list[dict], list[dict]]:
    h = read_json(os.path.join(out, "training_history.json"))
    return [e for e in h if "loss" in e], [dict(e["eval"], step=e["step"]) for e in h if "eval" in e]


def test_label_smoothing_in_a_run_moves_train_loss_not_the_eval_definition(
    tmp_path, corpus, tiny_config_dir, tokenizer_path
):
    runs = {}
    for smoothing in (0.0, 0.3):
        out = str(tmp_path / f"ls{smoothing}")
        import train_ddp  # a world of one, in this process

        assert (
            train_ddp.main(
                tiny_args(
                    tiny_config_dir,
                    tokenizer_path,
                    out,
                    str(tmp_path / "cache"),
                    train_file=corpus[0],
                    validation_file=corpus[1],
                    max_train_steps=2,
                    eval_steps=2,
                    label_smoothing=smoothing,
                )
            )
            == 0
        )
        runs[smoothing] = history(out)
    (train0, eval0), (train1, eval1) = runs[0.0], runs[0.3]
    # Step 1 runs the same initial weights on the same batch: only the loss definition differs.
    assert abs(train1[0]["loss"] - train0[0]["loss"]) > 1e-3
    # The evaluation before training (same weights) is identical: perplexity stays exp(unsmoothed NLL).
    assert eval0[0] == eval1[0]
    assert math.isclose(eval1[0]["perplexity"], math.exp(eval1[0]["loss"]), rel_tol=1e-12)


# ---------------------------------------------------------------------- (c) SWA
def test_swa_average_is_the_mean_of_the_snapshots():
    model = tiny_model()
    ids, labels = masked_batch()
    loss_module = MaskedLMLoss(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    swa = WeightAverage(model, start_step=3)
    snapshots = []
    for step in range(1, 7):
        opt.zero_grad()
        loss_module(ids, *masked_positions(labels)).backward()
        opt.step()
        swa.update(model, step)
        if step >= 3:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert swa.count == 4
    averaged = dict(swa.model.named_parameters())
    for name, _ in model.named_parameters():
        mean = torch.stack([s[name] for s in snapshots]).mean(dim=0)
        assert torch.allclose(averaged[name], mean, atol=1e-6), name
    # The snapshots differ, so the mean is not any one of them.
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert (snapshots[0][w] - snapshots[-1][w]).abs().max() > 1e-3
    assert (averaged[w] - snapshots[-1][w]).abs().max() > 1e-4


def test_swa_in_a_ddp_run_averages_the_saved_weights_and_resumes(tmp_path, corpus, tiny_config_dir, tokenizer_path):
    """2 ranks, checkpoints at every step: the SWA state saved at step 6 is the mean of the step-3..6 weights,
    each evaluation reports the average's perplexity, and best/ says which model it is."""
    from safetensors.torch import load_file

    out = str(tmp_path / "swa")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        train_file=corpus[0],
        validation_file=corpus[1],
        max_train_steps=6,
        eval_steps=3,
        save_steps=1,
        save_total_limit=10,
        swa_start_step=3,
        learning_rate=3e-3,
    )
    r = run_train(args, nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    weights = [load_file(os.path.join(out, "checkpoints", f"step-{s}", "model.safetensors")) for s in (3, 4, 5, 6)]
    swa = torch.load(os.path.join(out, "checkpoints", "step-6", "swa.pt"), weights_only=True)
    assert int(swa["n_averaged"]) == 4
    for name in weights[0]:
        mean = torch.stack([w[name] for w in weights]).mean(dim=0)
        assert torch.allclose(swa[f"module.{name}"], mean, atol=1e-6), name
    _, evals = history(out)
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert "swa_perplexity" not in evals[0] and evals[1]["swa_snapshots"] == 1 and evals[2]["swa_snapshots"] == 4
    # After one snapshot the average is the model itself.
    assert evals[1]["swa_perplexity"] == pytest.approx(evals[1]["perplexity"], rel=1e-9)
    best = read_json(os.path.join(out, "best", "eval_results.json"))
    assert best["swa"] == (best["swa_perplexity"] < best["perplexity"])

    # Resume from step 4 with the same command: the average goes on from the saved state, exactly.
    resumed = str(tmp_path / "resumed")
    import shutil

    shutil.copytree(out, resumed)
    for s in (5, 6):
        shutil.rmtree(os.path.join(resumed, "checkpoints", f"step-{s}"))
    r = run_train([a if a != out else resumed for a in args], nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    swa2 = torch.load(os.path.join(resumed, "checkpoints", "step-6", "swa.pt"), weights_only=True)
    assert max((swa2[k].float() - swa[k].float()).abs().max().item() for k in swa) <= 1e-6
