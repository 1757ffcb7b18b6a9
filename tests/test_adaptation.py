"""What practitioners bring from the Hugging Face scripts and the encoders they adapt (issue 33 d-f): an evaluation
masking rate of its own, every step-loop schedule transformers has with its kwargs, and the Trainer's names."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ROOT, make_text_file, small_corpus, text_chunks
from test_ddp import load_weights
from test_family_runs import family_args

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig, load_config_file
from mlm.data.cached import ChunkDataset, eval_shard
from mlm.train import engine

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


@pytest.fixture(scope="module")
def chunks(tokenizer, tmp_path_factory) -> ChunkDataset:
    return text_chunks(
        tokenizer, make_text_file(str(tmp_path_factory.mktemp("adaptation") / "t.txt"), n_lines=200, seed=4)
    )


def tiny_loss(vocab: int):
    from helpers import tiny_bert

    return engine.build_trainable(TrainConfig(), tiny_bert(vocab), "fp32", CPU, 10).loss


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


# ---------------------------------------------------------------------- b. a fresh head, said and warmed
@pytest.fixture(scope="module")
def encoder_only(tmp_path_factory, tokenizer_path) -> str:
    """A tiny BERT saved without its masked-LM head (as DeBERTa-v3 and sentence encoders ship), with a tokenizer."""
    from helpers import TINY_BERT
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = str(tmp_path_factory.mktemp("encoder-only"))
    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=30522, **TINY_BERT), add_pooling_layer=False).save_pretrained(d)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return small_corpus(tmp_path_factory.mktemp("adaptation-corpus"))


def run_args(model: str, corpus: dict, out: str, **kw) -> list[str]:
    """test_family_runs' run (4 steps here, a save at each, evaluation on start) on this module's corpus."""
    opts = {"max_train_steps": 4, "save_steps": 1, "eval_steps": 4, "eval_on_start": None, **kw}
    return family_args(model, out, corpus["cache"], (corpus["train"], corpus["valid"]), **opts)


def test_a_fresh_head_is_named_in_the_banner_and_the_card(encoder_only, corpus, tmp_path, capfd):
    from helpers import train_here

    out = str(tmp_path / "run")
    assert train_here(run_args(encoder_only, corpus, out, max_train_steps=1, eval_steps=1)) == 0
    printed = capfd.readouterr().out
    row = next(line for line in printed.splitlines() if line.strip().startswith("fresh head"))
    for tensor in ("cls.predictions.transform.dense.weight", "cls.predictions.bias"):
        assert tensor in row
    assert "the first perplexity is near the vocabulary size (30522)" in row
    assert "fill-mask before training is noise" in row and "--head_warmup_steps N" in row
    card = open(os.path.join(out, "best", "README.md"), encoding="utf-8").read()
    assert "Its masked-LM head was not trained before this run" in card and "cls.predictions.bias" in card


def test_a_trained_head_is_not_called_fresh(corpus, tmp_path, capfd, forced_model_dir):
    """A checkpoint that has its MLM head (forced_model_dir is a BertForMaskedLM) gets no such row."""
    from helpers import train_here

    out = str(tmp_path / "run")
    forced = make_text_file(str(tmp_path / "t.txt"), n_lines=200, seed=9)
    args = run_args(forced_model_dir, {**corpus, "train": forced, "valid": forced}, out, max_train_steps=1)
    assert train_here(args) == 0
    assert "fresh head" not in capfd.readouterr().out


def test_head_warmup_holds_the_encoder_bit_identical_on_two_ranks(encoder_only, corpus, tmp_path):
    from helpers import run_train
    from safetensors.torch import load_file

    out = str(tmp_path / "two")
    r = run_train(run_args(encoder_only, corpus, out, head_warmup_steps=2, max_train_steps=3), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert "the head trains alone for the first 2 steps" in r.stdout
    initial = load_file(os.path.join(encoder_only, "model.safetensors"))  # the encoder as shipped
    for step in (1, 2):
        saved = load_weights(out, step)
        for name, tensor in initial.items():
            assert torch.equal(saved[f"bert.{name}"], tensor), (step, name)  # not one bit moved
        assert not torch.equal(
            saved["cls.predictions.transform.dense.weight"],
            load_weights(out, 3)["cls.predictions.transform.dense.weight"],
        )
    after = load_weights(out, 3)
    moved = [n for n, t in initial.items() if not torch.equal(after[f"bert.{n}"], t)]
    assert len(moved) > len(initial) // 2  # then everything trains


def test_a_resume_across_the_head_warmup_boundary_is_exact(encoder_only, corpus, tmp_path):
    import shutil

    from helpers import train_here

    whole = str(tmp_path / "whole")
    args = dict(head_warmup_steps=2, max_train_steps=4)
    assert train_here(run_args(encoder_only, corpus, whole, **args)) == 0
    cut = str(tmp_path / "cut")  # stopped after step 1's checkpoint, inside the warmup
    shutil.copytree(whole, cut)
    for step in (2, 3, 4):
        shutil.rmtree(os.path.join(cut, "checkpoints", f"step-{step}"))
    assert train_here(run_args(encoder_only, corpus, cut, **args)) == 0
    a, b = load_weights(whole, 4), load_weights(cut, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_warmup_needs_a_head_it_can_tell_apart(monkeypatch, encoder_only, corpus, tmp_path, capfd):
    from helpers import train_here

    from mlm.model import heads

    monkeypatch.setattr(heads, "_FAMILIES", ())  # an unknown family: logits at every position
    monkeypatch.setattr("train_ddp.split_encoder_head", lambda model: (model, None))
    assert train_here(run_args(encoder_only, corpus, str(tmp_path / "o"), head_warmup_steps=2)) == 2
    assert "--head_warmup_steps 2: this model's masked-LM head is not one" in capfd.readouterr().err


# ---------------------------------------------------------------------- c. new tokens
def test_added_tokens_are_maskable_word_starts_and_added_special_tokens_never_masked(tmp_path):
    from families import byte_level_bpe
    from transformers import AutoTokenizer

    from mlm.data.masking import build_masking_tables

    for tok in (AutoTokenizer.from_pretrained(TOKENIZER_PATH()), byte_level_bpe(str(tmp_path / "bpe"))):
        tok.add_tokens(["[LEAD]", "quixotic"])
        tok.add_special_tokens({"additional_special_tokens": ["[POS]"]}, replace_extra_special_tokens=False)
        tables = build_masking_tables(tok)
        lead, quixotic, pos = tok.convert_tokens_to_ids(["[LEAD]", "quixotic", "[POS]"])
        assert not tables.special[lead] and not tables.special[quixotic] and tables.special[pos]
        assert not tables.continuation[lead] and not tables.continuation[quixotic]  # each starts a word
        assert lead in tables.ordinary_ids.tolist() and pos not in tables.ordinary_ids.tolist()


def TOKENIZER_PATH() -> str:
    from helpers import minilm_path

    return str(minilm_path())


def test_added_tokens_resize_train_save_resume_and_predict_like_the_pipeline(encoder_only, corpus, tmp_path, capfd):
    import shutil

    from helpers import train_here
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("[LEAD]\nquixotic\n")
    lead_text = make_text_file(str(tmp_path / "lead.txt"), n_lines=200, seed=11)
    with open(lead_text, "a", encoding="utf-8") as fh:
        fh.writelines("[LEAD] the quixotic cat sat on the mat .\n" for _ in range(60))
    data = {**corpus, "train": lead_text}
    out = str(tmp_path / "run")
    extra = dict(add_tokens=f"@{tokens}", add_special_tokens="[POS]", max_train_steps=4)
    assert train_here(run_args(encoder_only, data, out, **extra)) == 0
    printed = capfd.readouterr().out
    assert "embeddings resized 30522 -> 30525 for 3 added token(s): [LEAD], quixotic, [POS]" in printed
    for where in (os.path.join(out, "best"), os.path.join(out, "checkpoints", "step-4")):
        tok = AutoTokenizer.from_pretrained(where)
        assert len(tok) == 30525 and tok.convert_tokens_to_ids("[POS]") in tok.all_special_ids
    model = AutoModelForMaskedLM.from_pretrained(os.path.join(out, "best"))
    assert model.get_input_embeddings().num_embeddings == 30525
    assert model.get_output_embeddings().weight.shape[0] == 30525

    # A resume with the same tokens is exact; with other tokens it is one line.
    cut = str(tmp_path / "cut")
    shutil.copytree(out, cut)
    for step in (3, 4):
        shutil.rmtree(os.path.join(cut, "checkpoints", f"step-{step}"))
    assert train_here(run_args(encoder_only, data, cut, **extra)) == 0
    a, b = load_weights(out, 4), load_weights(cut, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    capfd.readouterr()
    other = {**extra, "add_tokens": "[LEAD]", "max_train_steps": 5}
    assert train_here(run_args(encoder_only, data, cut, **other)) == 2
    err = capfd.readouterr().err
    assert "cannot resume" in err and "its tokenizer was" in err and len(err.strip().splitlines()) == 1

    # predict.py equals the fill-mask pipeline on the model with added tokens.
    from test_predict import json_lines, run_main

    best = os.path.join(out, "best")
    texts = ["[LEAD] the [MASK] cat sat on the mat .", "the quixotic [MASK] sat on the mat ."]
    fill = pipeline("fill-mask", model=best, tokenizer=best, device="cpu")
    capfd.readouterr()
    code, printed, err = run_main(["--model", best, "--json", "--device", "cpu", *texts], capfd)
    assert code == 0, err
    for obj, text in zip(json_lines(printed), texts):
        expected = fill(text, top_k=5)
        got = obj["masks"][0]["candidates"]
        assert [c["token_id"] for c in got] == [e["token"] for e in expected]
        assert all(abs(c["score"] - e["score"]) <= 1e-5 for c, e in zip(got, expected))


def test_a_tokenizer_larger_than_the_model_resizes_it_with_a_banner_line(encoder_only, corpus, tmp_path, capfd):
    from helpers import train_here
    from transformers import AutoTokenizer

    bigger = str(tmp_path / "bigger-tokenizer")
    tok = AutoTokenizer.from_pretrained(encoder_only)
    tok.add_tokens(["zyzzyva"])
    tok.save_pretrained(bigger)
    out = str(tmp_path / "run")
    assert train_here(run_args(encoder_only, corpus, out, tokenizer_name=bigger, max_train_steps=1)) == 0
    assert "embeddings resized 30522 -> 30523 (the tokenizer is larger than the model)" in capfd.readouterr().out


def test_a_missing_token_file_is_one_line():
    from mlm.common.cli import UserError
    from mlm.config import parse_args

    with pytest.raises(UserError, match="is not a file; give @FILE with one token per line"):
        parse_args(["--add_tokens", "@/nonexistent/tokens.txt"])
    with pytest.raises(UserError, match="names no token"):
        parse_args(["--add_special_tokens", " , "])
