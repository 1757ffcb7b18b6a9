"""What practitioners bring from the Hugging Face scripts and the encoders they adapt (issue 33 d-f): an evaluation
masking rate of its own, every step-loop schedule transformers has with its kwargs, and the Trainer's names."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ROOT, make_text_file

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig, load_config_file
from mlm.data.cached import ChunkDataset, eval_shard, tokenize_texts
from mlm.train import engine

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


@pytest.fixture(scope="module")
def chunks(tokenizer, tmp_path_factory) -> ChunkDataset:
    path = make_text_file(str(tmp_path_factory.mktemp("adaptation") / "t.txt"), n_lines=200, seed=4)
    with open(path, encoding="utf-8") as fh:
        stream = tokenize_texts(tokenizer, fh.read().split("\n"))
    return ChunkDataset(stream, 32, tokenizer.cls_token_id, tokenizer.sep_token_id)


def tiny_loss(vocab: int):
    from helpers import TINY_BERT
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab, **TINY_BERT))
    return engine.build_trainable(TrainConfig(), model, "fp32", CPU, 10).loss


def evaluation(tokenizer, chunks, **masking) -> dict:
    loader = torch.utils.data.DataLoader(
        chunks, batch_size=8, sampler=eval_shard(len(chunks), 0, 1), collate_fn=lambda b: b
    )
    return engine.evaluate(
        tiny_loss(len(tokenizer)), loader, ENV, engine.build_masking(TrainConfig(**masking), tokenizer), "fp32"
    )


# ---------------------------------------------------------------------- d. the evaluation's masking rate
def test_evaluation_masks_at_the_training_rate_unless_told(tokenizer, chunks):
    at_30 = evaluation(tokenizer, chunks, mlm_probability=0.3)
    at_15 = evaluation(tokenizer, chunks, mlm_probability=0.15)
    assert at_30["masked_tokens"] > 1.6 * at_15["masked_tokens"]  # by default, the training rate
    told = evaluation(tokenizer, chunks, mlm_probability=0.3, eval_mlm_probability=0.15)
    # Trained at 30%, evaluated at 15%: the very masks (a pure function of the seed and the example) and figures
    # of a run that trains at 15%.
    assert told == at_15


def test_the_modernbert_preset_evaluates_at_15_percent():
    values = load_config_file(os.path.join(ROOT, "configs", "modernbert-base.yaml"))
    assert values["mlm_probability"] == 0.3 and values["eval_mlm_probability"] == 0.15


def test_an_evaluation_rate_outside_0_1_is_one_line():
    from mlm.common.cli import UserError
    from mlm.config import parse_args

    with pytest.raises(UserError, match=r"--eval_mlm_probability must be in \(0, 1\)"):
        parse_args(["--eval_mlm_probability", "1.5"])


# ---------------------------------------------------------------------- e. every step-loop schedule
SCHEDULE_KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 8},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"power": 2.0, "lr_end": 1e-7},
    "inverse_sqrt": {"timescale": 5},
}


def test_the_schedules_are_every_step_schedule_transformers_has():
    from transformers.trainer_utils import SchedulerType

    from mlm.config import SCHEDULERS

    metric_driven = {"reduce_lr_on_plateau", "greedy"}
    assert set(SCHEDULERS) == {s.value for s in SchedulerType} - metric_driven


def schedule(name: str, total: int, batch: int, kwargs: dict):
    import json

    from mlm.train.optim import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    cfg = TrainConfig(
        learning_rate=1e-3,
        num_warmup_steps=4,
        lr_scheduler_type=name,
        lr_scheduler_kwargs=json.dumps(kwargs) if kwargs else None,
    )
    return build_scheduler(cfg, optimizer, total, batch)


def lrs(s, steps: int, skipped_at: tuple = ()) -> list[float]:
    out = []
    for i in range(steps):
        s.step(torch.tensor(1 if i in skipped_at else 0))
        out.append(s.get_last_lr()[0])
    return out


@pytest.mark.parametrize("name", sorted(TrainConfig.__dataclass_fields__["lr_scheduler_type"].metadata["choices"]))
def test_each_schedule_resumes_exactly_and_continues_by_examples_under_another_batch(name):
    from transformers import get_scheduler

    kwargs = SCHEDULE_KWARGS.get(name, {})
    total = 40
    whole = schedule(name, total, 8, kwargs)
    reference = lrs(whole, total, skipped_at=(3,))
    # The library's own schedule, by applied steps (a skipped step does not advance it).
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    from mlm.config import schedule_defaults

    library = get_scheduler(
        name,
        stand_in,
        num_warmup_steps=4,
        num_training_steps=total,
        scheduler_specific_kwargs=schedule_defaults(name, kwargs, total),
    ).lr_lambdas[0]
    applied = [i if i <= 3 else i - 1 for i in range(1, total + 1)]
    assert reference == pytest.approx([1e-3 * library(a) for a in applied], rel=1e-6)
    if name != "constant":  # the schedule moves: the comparisons below can fail
        assert len(set(round(x, 12) for x in reference)) > 3

    # Resume: a fresh schedule loaded from the state after 17 steps continues exactly.
    first = schedule(name, total, 8, kwargs)
    lrs(first, 17, skipped_at=(3,))
    resumed = schedule(name, total, 8, kwargs)
    resumed.load_state_dict(first.state_dict())
    assert lrs(resumed, total - 17) == pytest.approx(reference[17:], rel=1e-6)

    # Another global batch (16 instead of 8): each step of it covers two of the original, by examples seen.
    wider = schedule(name, total, 16, kwargs)
    state = first.state_dict()
    wider.load_state_dict(state)
    position = state["position"]
    expected = [1e-3 * library(position + 2 * (j + 1)) for j in range(10)]
    assert lrs(wider, 10) == pytest.approx(expected, rel=1e-6)


def test_a_schedule_missing_its_argument_is_one_line():
    from mlm.common.cli import UserError
    from mlm.config import parse_args

    with pytest.raises(UserError, match="min_lr or min_lr_rate"):
        parse_args(["--lr_scheduler_type", "cosine_with_min_lr"])
    with pytest.raises(UserError, match="is not JSON"):
        parse_args(["--lr_scheduler_kwargs", "{min_lr_rate: 0.1}"])
    with pytest.raises(UserError, match="unexpected keyword argument 'bogus'"):
        parse_args(["--lr_scheduler_kwargs", '{"bogus": 1}'])
    cfg = parse_args(["--lr_scheduler_type", "warmup_stable_decay"])  # decays over the last 10% by default
    assert cfg.lr_scheduler_kwargs is None


# ---------------------------------------------------------------------- f. the Trainer's names
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max_steps", "7"], {"max_train_steps": 7}),
        (["--warmup_steps", "12"], {"num_warmup_steps": 12}),
        (["--warmup_steps", "0.1"], {"warmup_ratio": 0.1, "num_warmup_steps": None}),
        (["--bf16"], {"precision": "bf16"}),
        (["--max_steps", "7", "--max_train_steps", "7"], {"max_train_steps": 7}),
    ],
)
def test_the_trainers_names_are_aliases(argv, expected):
    from mlm.config import parse_command_line

    cfg, given = parse_command_line(argv)
    for k, v in expected.items():
        assert getattr(cfg, k) == v
        if v is not None:
            assert k in given  # a resume treats it as given, as the original's name would be


def test_fp16_is_an_alias_of_precision_fp16(monkeypatch):
    from mlm.config import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fp16 is refused on a CPU-only machine
    assert parse_args(["--fp16"]).precision == "fp16"


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--max_steps", "7", "--max_train_steps", "8"], "--max_steps (the Trainer's name) gives max_train_steps 7"),
        (["--bf16", "--precision", "fp32"], "--bf16 (the Trainer's name) gives precision 'bf16'"),
        (["--fp16", "--bf16"], "--fp16 and --bf16 both given"),
        (["--warmup_steps", "10", "--warmup_ratio", "0.2"], "--warmup_steps (the Trainer's name) and --warmup_ratio"),
    ],
)
def test_an_alias_and_its_original_that_disagree_are_one_line(argv, said):
    from mlm.common.cli import UserError
    from mlm.config import parse_args

    with pytest.raises(UserError) as e:
        parse_args(argv)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_the_aliases_work_in_a_config_file(tmp_path):
    from mlm.config import parse_args

    path = tmp_path / "run.yaml"
    path.write_text(
        "max_steps: 9\nwarmup_steps: 3\nlr_scheduler_type: cosine_with_min_lr\n"
        "lr_scheduler_kwargs: {min_lr_rate: 0.1}\n"
    )
    cfg = parse_args(["--config", str(path)])
    assert (cfg.max_train_steps, cfg.num_warmup_steps) == (9, 3)
    assert cfg.lr_scheduler_kwargs == '{"min_lr_rate": 0.1}'


def test_model_revision_reaches_every_from_pretrained(monkeypatch, tokenizer_path):
    """--model_revision is passed to the config's, the tokenizer's and the model's from_pretrained."""
    import transformers

    from mlm.model import modeling

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForMaskedLM):
        real = cls.from_pretrained

        def spy(*a, _real=real, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("revision")))
            kw.pop("revision", None)  # a local directory has no revisions
            return _real(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    cfg = TrainConfig(model_name_or_path=str(tokenizer_path), model_revision="v1.0")
    config = modeling.load_model_config(cfg)
    tokenizer = modeling.load_tokenizer(cfg)
    modeling.build_model(cfg, config, tokenizer)
    # (The tokenizer's own lookup of its config comes after the spy dropped the revision: counted as None.)
    assert {name for name, revision in seen if revision == "v1.0"} == {
        "AutoConfig",
        "AutoTokenizer",
        "AutoModelForMaskedLM",
    }, seen
