"""Judging one answer: every check type on answers that pass and answers that fail, the
refusal boundary, and the behaviour fingerprint."""

from __future__ import annotations

import pytest

from gateway.evals.checks import check_passes, failed_checks, fingerprint, is_refusal
from gateway.evals.suite import Case, Suite

SUITE = Suite.model_validate({"cases": [{"id": "a", "prompt": "x"}]})
SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "integer", "minimum": 1}},
    "required": ["order"],
    "additionalProperties": False,
}


def check(data: dict) -> object:
    return Case.model_validate({"id": "c", "prompt": "x", "checks": [data]}).checks[0]


@pytest.mark.parametrize(
    ("data", "good", "bad"),
    [
        ({"type": "json"}, ' {"a": [1, 2]}\n', '{"a": NaN}'),
        ({"type": "json"}, "[]", "Sure! {}"),
        ({"type": "json_schema", "schema": SCHEMA}, '{"order": 7}', '{"order": 0}'),
        ({"type": "json_schema", "schema": SCHEMA}, '{"order": 7}', '{"order": 7, "x": 1}'),
        ({"type": "json_schema", "schema": {"type": "array"}}, "[1]", '"[1]"'),
        ({"type": "regex", "pattern": r"order #\d+"}, "see order #12.", "see order #x"),
        ({"type": "contains", "text": "Refund"}, "Refund issued", "refund issued"),
        ({"type": "contains", "text": "Refund", "ignore_case": True}, "refund", "credit"),
        ({"type": "not_contains", "text": "password"}, "no secrets", "the password is"),
        ({"type": "equals", "text": "Paris"}, "  Paris\n", "Paris."),
        ({"type": "refusal", "expected": True}, "I\u2019m sorry, I can\u2019t help.", "Sure."),
        ({"type": "refusal", "expected": False}, "Here is how.", "I cannot do that."),
        ({"type": "max_words", "limit": 3}, "one two  three", "one two three four"),
    ],
)
def test_each_check_passes_what_it_should_and_fails_what_it_should(data, good, bad):
    judged = check(data)
    assert check_passes(judged, good, SUITE) is True
    assert check_passes(judged, bad, SUITE) is False


def test_a_schema_past_the_checkers_bounds_is_a_failure_not_a_pass():
    wide = {"anyOf": [{"type": "string"}] * 30_000}  # more steps than the checker takes
    judged = check({"type": "json_schema", "schema": wide})
    assert check_passes(judged, "{}", SUITE) is False
    assert check_passes(judged, '"x"', SUITE) is True  # the first branch holds at once


def test_a_schema_too_deep_to_write_back_is_refused():
    deep: dict = {"type": "object"}
    for _ in range(70):
        deep = {"properties": {"a": deep}}
    with pytest.raises(ValueError, match="nested deeper than 64"):
        check({"type": "json_schema", "schema": deep})


def test_a_backtracking_regex_fails_in_its_time_instead_of_hanging():
    judged = check({"type": "regex", "pattern": r"(a|aa)+$"})
    assert check_passes(judged, "a" * 40 + "b", SUITE) is False
    assert check_passes(judged, "aaaa", SUITE) is True


def test_a_refusal_opens_the_answer_and_a_suite_may_name_its_own_markers():
    assert is_refusal("  I CANNOT share that.", SUITE.refusal_markers)
    assert not is_refusal("x " * 200 + "I cannot", SUITE.refusal_markers)  # quoted, late
    own = Suite.model_validate({"cases": [{"id": "a", "prompt": "x"}], "refusal_markers": ["nope"]})
    assert is_refusal("Nope.", own.refusal_markers) and not is_refusal(
        "I cannot", own.refusal_markers
    )


def test_failed_checks_names_each_failure_and_an_error_is_a_failure():
    case = Case.model_validate(
        {
            "id": "c",
            "prompt": "x",
            "checks": [
                {"type": "json"},
                {"type": "max_words", "limit": 1},
                {"type": "regex", "pattern": "a"},
            ],
        }
    )
    assert failed_checks(case, "a b", SUITE) == ["json", "max_words"]
    assert failed_checks(case, '"a"', SUITE) == []
    assert failed_checks(case, None, SUITE) == ["error"]
    assert failed_checks(Case.model_validate({"id": "c", "prompt": "x"}), "", SUITE) == []


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ('{"a": 1}', "json/short"),
        ("I'm sorry, no.", "refusal/short"),
        ("word " * 50, "text/medium"),
        ("word " * 101, "text/long"),
        (None, "error"),
    ],
)
def test_the_fingerprint_is_the_answers_shape_and_length_band(text, shape):
    assert fingerprint(text, SUITE) == shape
