"""ModelRef: one grammar for every place that takes a model reference, each form round-tripping
through `str`, and one error that quotes the reference, says what is wrong and gives the grammar."""

from __future__ import annotations

import pytest

from distml.core.errors import DistmlError
from distml.core.refs import GRAMMAR, NAME_RULE, ModelRef, check_name, parse_version

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cnn", ModelRef(name="cnn")),
        ("cnn:3", ModelRef(name="cnn", version=3)),
        ("digits-classifier@production", ModelRef(name="digits-classifier", alias="production")),
        ("v1.2_b-c:12", ModelRef(name="v1.2_b-c", version=12)),
        (DIGEST, ModelRef(digest=DIGEST)),
    ],
)
def test_each_form_parses_and_prints_back(text, expected):
    ref = ModelRef.parse(text)
    assert ref == expected
    assert str(ref) == text
    assert ModelRef.parse(ref) is ref, "a parsed reference passes through"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cnn:x", "the version must be a positive integer"),
        ("cnn:0", "the version must be a positive integer"),
        ("cnn:", "the version must be a positive integer"),
        ("cnn:1:2", "the version must be a positive integer"),
        (":2", f"the name must be {NAME_RULE}"),
        ("@prod", f"the name must be {NAME_RULE}"),
        ("bad name", f"the name must be {NAME_RULE}"),
        ("cnn@", f"the alias must be {NAME_RULE}"),
        ("cnn@a b", f"the alias must be {NAME_RULE}"),
        ("cnn@" + DIGEST, f"the alias must be {NAME_RULE}"),
        ("cnn:3@prod", "it names both a version and an alias"),
        ("AB" * 32, None),  # upper-case hex is a name, not a digest: valid, so not here
    ],
)
def test_a_bad_reference_gets_one_error_with_the_grammar(text, problem):
    if problem is None:
        assert ModelRef.parse(text).name == text
        return
    with pytest.raises(DistmlError) as info:
        ModelRef.parse(text)
    assert str(info.value) == f"model reference {text!r} is not valid ({problem}); {GRAMMAR}"


@pytest.mark.parametrize("text", ["", None, 3, ["cnn"]])
def test_what_is_not_text_is_refused(text):
    with pytest.raises(DistmlError, match=f"is not valid; {GRAMMAR}"):
        ModelRef.parse(text)


def test_pinned_takes_name_and_version_only():
    assert ModelRef.pinned("cnn:2") == ModelRef(name="cnn", version=2)
    for text in ("cnn", "cnn@prod", DIGEST):
        with pytest.raises(DistmlError, match="is not valid here; expected NAME:VERSION such as cnn:3"):
            ModelRef.pinned(text)


@pytest.mark.parametrize(("text", "number"), [("3", 3), (3, 3), ("cnn:4", 4)])
def test_a_version_of_a_known_model(text, number):
    assert parse_version(text, "cnn") == number


@pytest.mark.parametrize("text", ["x", "0", "-1", True, None, "mlp:4", "3.0"])
def test_a_bad_version_is_refused(text):
    with pytest.raises(DistmlError, match="is not valid; expected a positive integer such as 3 or cnn:3"):
        parse_version(text, "cnn")


def test_check_name_names_what_it_checked():
    assert check_name("alias", "prod") == "prod"
    with pytest.raises(DistmlError, match="alias 'a b' is not valid; expected 1-200 letters"):
        check_name("alias", "a b")
