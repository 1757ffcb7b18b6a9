"""Property-based: malformed values thrown at the config parser and malformed text at the fill-mask API give
either a result or one clean UserError line, never another exception (a traceback) and never a hang."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlm.config import TrainConfig, UserError, parse_args

OPTIONS = [f.name for f in dataclasses.fields(TrainConfig)] + ["config"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e309", "nan", "-inf", "0x10", "1_000", "", " ", "true", "none"]),
)
junk = st.text(max_size=40).filter(lambda s: not s.startswith(("-h", "--h")))
values = st.one_of(numbers, junk)


def assert_clean(error: UserError) -> None:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)


@SETTINGS
@given(pairs=st.lists(st.tuples(st.sampled_from(OPTIONS), values), min_size=1, max_size=4))
def test_config_parser_gives_a_config_or_one_clean_error(pairs, tmp_path_factory):
    out = str(tmp_path_factory.getbasetemp() / "fuzz-out")
    argv = ["--output_dir", out, "--report_to", "none"]
    for name, value in pairs:
        argv += [f"--{name}", value]
    try:
        cfg = parse_args(argv)
    except UserError as e:
        assert_clean(e)
    else:
        assert isinstance(cfg, TrainConfig)


@SETTINGS
@given(
    content=st.one_of(
        st.text(max_size=200),
        st.dictionaries(
            st.sampled_from(OPTIONS + ["no_such_key"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(),
                st.text(max_size=20),
                st.lists(st.integers(), max_size=3),
            ),
            max_size=4,
        ).map(repr),
    )
)
def test_config_file_gives_a_config_or_one_clean_error(content, tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.getbasetemp()), "fuzz.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(content.replace("'", '"') if content.startswith("{") else content)
    try:
        parse_args(["--config", path, "--output_dir", str(tmp_path_factory.getbasetemp() / "fuzz-out")])
    except UserError as e:
        assert_clean(e)


@pytest.fixture(scope="module")
def fill(forced_model_dir):
    from mlm.inference.fill_mask import FillMask

    return FillMask(forced_model_dir, device="cpu")


pieces = st.one_of(
    st.text(max_size=15),
    st.sampled_from(
        [
            "[MASK]",
            "[mask]",
            "<mask>",
            "[MASK",
            "MASK]",
            " ",
            "he",
            "good",
            "\n",
            "\t",
            "[CLS]",
            "[SEP]",
            "[PAD]",
            "good " * 70,
        ]
    ),
)  # with a mask: too long


@SETTINGS
@given(
    texts=st.lists(st.lists(pieces, max_size=12).map("".join), min_size=0, max_size=3),
    top_k=st.integers(-2, 12),
    targets=st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=3)),
)
def test_fill_mask_gives_predictions_or_one_clean_error(fill, texts, top_k, targets):
    try:
        preds = fill.predict(texts, top_k=top_k, targets=targets)
    except UserError as e:
        assert_clean(e)
    else:
        assert len(preds) == len(texts)
        for p in preds:
            assert p.masks and all(m.candidates for m in p.masks)
            assert all(len(f.token_ids) == len(p.masks) for f in p.fills)
