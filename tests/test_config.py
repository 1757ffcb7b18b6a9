"""mlm/config.py: defaults, the --config file, bool flags, --help, and every value check (a UserError each)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from mlm.config import TrainConfig, UserError, parse_args

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def parse(tmp_path, *argv) -> TrainConfig:
    return parse_args(["--output_dir", str(tmp_path / "out"), *map(str, argv)])


def write_yaml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------- defaults
def test_defaults_match_the_brief(tmp_path):
    c = parse(tmp_path)
    assert c.model_name_or_path == "bert-base-uncased" and not c.from_scratch
    assert (c.dataset_name, c.dataset_config_name) == ("wikitext", "wikitext-2-raw-v1")
    assert (c.train_file, c.validation_file, c.dataset_dir) == (None, None, None)
    assert c.max_seq_length == 128
    assert c.mlm_probability == 0.15
    assert (c.mask_replace_prob, c.random_replace_prob) == (0.8, 0.1)
    assert c.per_device_train_batch_size == 32 and c.gradient_accumulation_steps == 1
    assert c.learning_rate == 5e-5
    assert c.weight_decay == 0.01
    assert c.num_train_epochs == 10 and c.max_train_steps is None
    assert c.early_stopping_patience == 3
    assert c.lr_scheduler_type == "linear" and c.warmup_ratio == 0.06 and c.num_warmup_steps is None
    assert c.precision == "auto"
    assert c.line_by_line is False and c.whole_word_mask is False
    assert c.output_dir == str(tmp_path / "out")


def test_default_output_dir_is_named_after_model_and_data():
    c = TrainConfig()
    c.resolve_and_validate()
    assert c.output_dir == os.path.join("outputs", "bert-base-uncased-wikitext-2-raw-v1")


def test_config_name_or_overrides_means_from_scratch(tmp_path, tiny_config_dir, tokenizer_path):
    c = parse(tmp_path, "--config_name", tiny_config_dir, "--tokenizer_name", tokenizer_path)
    assert c.from_scratch and c.model_name_or_path is None
    c = parse(tmp_path, "--config_overrides", "num_hidden_layers=2", "--tokenizer_name", tokenizer_path)
    assert c.from_scratch and c.model_name_or_path is None
    with pytest.raises(UserError, match="--tokenizer_name"):
        parse(tmp_path, "--config_overrides", "num_hidden_layers=2")


def test_local_data_replaces_the_hub_dataset(tmp_path, text_file):
    c = parse(tmp_path, "--train_file", text_file)
    assert (c.dataset_name, c.dataset_config_name) == (None, None)


def test_another_hub_dataset_does_not_inherit_the_wikitext_configuration(tmp_path):
    c = parse(tmp_path, "--dataset_name", "bookcorpus")
    assert (c.dataset_name, c.dataset_config_name) == ("bookcorpus", None)
    c = parse(tmp_path, "--dataset_name", "wikitext", "--dataset_config_name", "wikitext-103-raw-v1")
    assert c.dataset_config_name == "wikitext-103-raw-v1"


# ---------------------------------------------------------------------- --config FILE
@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_config_file_supplies_values_and_the_command_line_wins(tmp_path, kind):
    values = {
        "learning_rate": "1e-4",
        "per_device_train_batch_size": 8,
        "line_by_line": True,
        "lr_scheduler_type": "cosine",
        "max_train_steps": 100,
        "mlm_probability": 0.2,
    }
    if kind == "json":
        path = tmp_path / "run.json"
        path.write_text(json.dumps(values))
    else:  # YAML reads 1e-4 as a string; it goes through the same conversion as the command line
        path = tmp_path / "run.yaml"
        path.write_text("".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in values.items()))
    c = parse(tmp_path, "--config", str(path), "--per_device_train_batch_size", "16", "--no_line_by_line")
    assert c.learning_rate == 1e-4 and isinstance(c.learning_rate, float)
    assert c.lr_scheduler_type == "cosine" and c.max_train_steps == 100 and c.mlm_probability == 0.2
    assert c.per_device_train_batch_size == 16  # the command line overrides the file
    assert c.line_by_line is False
    c = parse(tmp_path, "--config", str(path))
    assert c.per_device_train_batch_size == 8 and c.line_by_line is True


def test_config_file_order_does_not_matter(tmp_path):
    path = write_yaml(tmp_path / "run.yml", "seed: 7\nweight_decay: 0.0\n")
    a = parse_args(["--seed", "3", "--config", path, "--output_dir", str(tmp_path / "o")])
    b = parse_args(["--config", path, "--seed", "3", "--output_dir", str(tmp_path / "o")])
    assert a == b and a.seed == 3 and a.weight_decay == 0.0


def test_unknown_key_in_config_file_is_a_user_error(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "learning_rate: 1e-4\nlearnign_rate: 3e-4\n")
    with pytest.raises(UserError, match="learnign_rate"):
        parse(tmp_path, "--config", path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("per_device_train_batch_size: eight\n", "per_device_train_batch_size"),
        ("per_device_train_batch_size: 8.5\n", "per_device_train_batch_size"),
        ("line_by_line: maybe\n", "line_by_line"),
        ("lr_scheduler_type: bogus\n", "--lr_scheduler_type"),  # choices are checked for file values too
        ("mlm_probability: 1.5\n", "--mlm_probability"),  # and so is every range
        ("- a\n- list\n", "mapping"),
        ("learning_rate: [unclosed\n", "could not be parsed"),
    ],
)
def test_bad_config_file_values_are_user_errors(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        parse(tmp_path, "--config", write_yaml(tmp_path / "run.yaml", text))


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse(tmp_path, "--config", str(tmp_path / "nope.yaml"))


def test_integral_float_in_config_file_is_an_int(tmp_path):
    c = parse(tmp_path, "--config", write_yaml(tmp_path / "run.yaml", "per_device_train_batch_size: 8.0\n"))
    assert c.per_device_train_batch_size == 8 and isinstance(c.per_device_train_batch_size, int)


# ---------------------------------------------------------------------- bool flags
@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--line_by_line"], True),
        (["--line_by_line", "true"], True),
        (["--line_by_line", "false"], False),
        (["--line_by_line", "0"], False),
        (["--line_by_line", "--no_line_by_line"], False),
        (["--no_line_by_line", "--line_by_line"], True),  # the last one given wins
    ],
)
def test_bool_flags(tmp_path, argv, expected):
    assert parse(tmp_path, *argv).line_by_line is expected


def test_no_flag_turns_off_a_default_true(tmp_path):
    assert parse(tmp_path).eval_on_start is True
    assert parse(tmp_path, "--no_eval_on_start").eval_on_start is False
    assert parse(tmp_path, "--eval_on_start", "false").eval_on_start is False


def test_bool_flag_with_a_bad_value_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="line_by_line"):
        parse(tmp_path, "--line_by_line", "maybe")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--no_such_option", "1"], "--no_such_option"),
        (["--per_device_train_batch_size", "eight"], "per_device_train_batch_size"),
        (["--precision", "fp8"], "precision"),
    ],
)
def test_command_line_mistakes_are_user_errors_pointing_at_help(tmp_path, argv, match):
    with pytest.raises(UserError, match=match) as e:
        parse(tmp_path, *argv)
    assert "--help" in str(e.value)


# ---------------------------------------------------------------------- --help
def test_help_lists_every_option(capfd):
    import train_ddp

    # What `python train_ddp.py --help` runs, in this process: torchelastic's @record turns argparse's
    # SystemExit(0) into None, which sys.exit(main()) makes exit code 0.
    assert train_ddp.main(["--help"]) is None
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    missing = [name for name in FIELDS if f"--{name}" not in out]
    assert not missing, f"--help does not list {missing}"
    assert "--config" in out and "torchrun" in out


def test_every_field_has_a_help_string():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help", "").strip(), f.name


# ---------------------------------------------------------------------- value checks
BAD_VALUES = [
    ("mlm_probability", 0.0),
    ("mlm_probability", 1.0),
    ("mlm_probability", -0.1),
    ("mlm_probability", 1.5),
    ("mask_replace_prob", -0.1),
    ("mask_replace_prob", 1.1),
    ("random_replace_prob", -0.1),
    ("random_replace_prob", 1.1),
    ("per_device_train_batch_size", 0),
    ("per_device_train_batch_size", -1),
    ("per_device_eval_batch_size", 0),
    ("gradient_accumulation_steps", 0),
    ("logging_steps", 0),
    ("save_total_limit", 0),
    ("max_train_steps", 0),
    ("eval_steps", 0),
    ("save_steps", 0),
    ("max_train_samples", 0),
    ("max_eval_samples", 0),
    ("preprocessing_num_workers", 0),
    ("max_seq_length", 4),
    ("max_seq_length", 0),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-4),
    ("weight_decay", -0.01),
    ("adam_beta1", 1.0),
    ("adam_beta1", -0.1),
    ("adam_beta2", 1.0),
    ("adam_epsilon", 0.0),
    ("max_grad_norm", -1.0),
    ("num_train_epochs", 0.0),
    ("num_train_epochs", -1.0),
    ("warmup_ratio", 1.0),
    ("warmup_ratio", -0.1),
    ("num_warmup_steps", -1),
    ("validation_split_percentage", 100),
    ("validation_split_percentage", -1),
    ("early_stopping_patience", -1),
    ("early_stopping_min_delta", -0.5),
    ("seed", -1),
    ("max_probe_samples", 9),  # fewer than two rows a fold of the default 5
]


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_each_numeric_check_raises_a_user_error_naming_the_option(tmp_path, name, value):
    with pytest.raises(UserError, match=f"--{name}") as e:
        TrainConfig(**{name: value, "output_dir": str(tmp_path / "out")}).resolve_and_validate()
    assert "\n" not in str(e.value)  # one line
    # The same check on the command line path.
    with pytest.raises(UserError, match=f"--{name}"):
        parse(tmp_path, f"--{name}", str(value))


def test_mask_and_random_replacement_must_not_exceed_one(tmp_path):
    with pytest.raises(UserError, match="must not exceed 1"):
        parse(tmp_path, "--mask_replace_prob", "0.9", "--random_replace_prob", "0.2")
    parse(tmp_path, "--mask_replace_prob", "0.9", "--random_replace_prob", "0.1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--max_grad_norm", "0"],
        ["--early_stopping_patience", "0"],
        ["--num_warmup_steps", "0"],
        ["--warmup_ratio", "0"],
        ["--validation_split_percentage", "0"],
        ["--weight_decay", "0"],
        ["--mlm_probability", "0.5"],
        ["--max_seq_length", "8"],
        ["--num_train_epochs", "0.5"],
    ],
)
def test_boundary_values_that_are_allowed(tmp_path, argv):
    parse(tmp_path, *argv)


def test_fp16_on_cpu_is_a_user_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a CUDA GPU")
    with pytest.raises(UserError, match="--precision fp16"):
        parse(tmp_path, "--precision", "fp16")


# ---------------------------------------------------------------------- paths
def test_path_checks(tmp_path, text_file, tokenizer_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(UserError, match="is a file"):
        parse_args(["--output_dir", str(tmp_path / "a-file")])
    with pytest.raises(UserError, match="no config.json"):
        parse(tmp_path, "--model_name_or_path", str(tmp_path / "empty-dir"), "--tokenizer_name", tokenizer_path)
    with pytest.raises(UserError, match="not both"):
        parse(tmp_path, "--train_file", text_file, "--dataset_dir", str(tmp_path))
    with pytest.raises(UserError, match="--validation_file needs --train_file"):
        parse(tmp_path, "--validation_file", text_file)
    with pytest.raises(UserError, match="unsupported extension"):
        parse(tmp_path, "--train_file", str(tmp_path / "a-file"))
    with pytest.raises(UserError, match="--resume_from_checkpoint"):
        parse(tmp_path, "--resume_from_checkpoint", str(tmp_path / "no-such-step"))


@pytest.mark.parametrize(
    "text, seconds",
    [("11h30m", 41400), ("90m", 5400), ("3600", 3600), ("45s", 45), ("1.5h", 5400), ("1h2m3s", 3723), (" 2H ", 7200)],
)
def test_max_runtime_reads_a_duration(text, seconds):
    from mlm.config import runtime_seconds

    assert runtime_seconds(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5", "", "h", "10x"])
def test_a_bad_max_runtime_is_a_one_line_error(text):
    with pytest.raises(UserError, match=r"--max_runtime .*: give a positive duration such as 11h30m, 90m"):
        parse_args(["--max_runtime", text])


def test_the_budget_stops_while_a_step_and_a_checkpoint_still_fit():
    import time

    from mlm.train.preemption import OUT_OF_TIME, StopRequest

    request = StopRequest(25.0, budget=10.0, started=time.monotonic() - 8.0)
    request.expect(step_seconds=0.5, save_seconds=0.5)
    assert not request.out_of_time() and request.agreed() == 0  # 8 + 1.1 s < 10
    request.expect(step_seconds=1.0, save_seconds=1.0)
    assert request.out_of_time() and request.agreed() == OUT_OF_TIME  # 8 + 2.2 s >= 10
    assert not StopRequest(25.0).out_of_time()  # no budget


def test_a_typed_value_with_a_newline_is_still_a_one_line_error(tmp_path):
    """argparse quotes the bad value in its message: a newline in it is shown as \\n (the fuzz test found it)."""
    with pytest.raises(UserError) as e:
        parse_args(["--output_dir", str(tmp_path / "o"), "--trust_remote_code", "\n"])
    assert "\n" not in str(e.value) and "got \\n but expected" in str(e.value)


def test_help_lists_each_option_once_under_its_section():
    """--help is grouped by the sections the config declares (config.GROUPS), each field under its own."""
    from mlm.config import GROUPS, build_parser

    text = build_parser().format_help()
    titles = list(GROUPS.values())
    starts = [text.index(f"\n{title}:\n") for title in titles]
    assert starts == sorted(starts)
    bounds = dict(zip(titles, zip(starts, starts[1:] + [len(text)])))
    for f in dataclasses.fields(TrainConfig):
        begin, end = bounds[GROUPS[f.metadata["group"]]]
        entry = re.compile(rf"^  --{f.name}\b", re.M)  # an option's own line, not a mention in another's help
        assert len(entry.findall(text)) == 1, f.name
        assert entry.search(text, begin, end), f"--{f.name} is not under {GROUPS[f.metadata['group']]!r}"


def test_help_says_each_default_once_and_as_it_is():
    """No "(default: None)" after a help that states its own default, a separator shown as '\\n', and --no_tf32
    described as what it turns off, not with --tf32's text and a default of False."""
    from mlm.config import build_parser

    text = build_parser().format_help()
    entries = re.split(r"\n(?=  -)", text[text.index("\nthe model:") :])
    for entry in entries:
        said = entry.count("(default")
        assert said <= 1, entry
    model = next(e for e in entries if e.startswith("  --model_name_or_path"))
    assert "(default bert-base-uncased when" in model and "(default: None)" not in model
    assert "(default: '\\n')" in next(e for e in entries if e.startswith("  --text_separator"))
    no_tf32 = next(e for e in entries if e.startswith("  --no_tf32"))
    assert "Turn --tf32 off." in no_tf32 and "Allow TF32" not in no_tf32 and "(default" not in no_tf32
    assert "(default: 128)" in next(e for e in entries if e.startswith("  --max_seq_length"))
