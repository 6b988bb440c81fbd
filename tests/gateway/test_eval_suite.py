"""Eval suites: what a suite file may say, and each refusal naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.evals.suite import DEFAULT_REFUSAL_MARKERS, SuiteError, load_suite

CHAT = {"id": "greet", "messages": [{"role": "user", "content": "hi"}]}


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_a_json_suite_keeps_its_settings_and_a_jsonl_suite_takes_the_defaults(tmp_path):
    suite = load_suite(
        write(
            tmp_path,
            "s.json",
            {
                "name": "support v3",
                "max_regression": 0.05,
                "cases": [
                    {**CHAT, "slice": "chit-chat", "checks": [{"type": "max_words", "limit": 5}]},
                    {
                        "id": "json-1",
                        "prompt": "{",
                        "checks": [{"type": "json_schema", "schema": {}}],
                    },
                ],
            },
        )
    )
    assert suite.name == "support v3" and suite.max_regression == 0.05
    assert [case.id for case in suite.cases] == ["greet", "json-1"]
    assert suite.cases[1].checks[0].type == "json_schema"
    lines = "\n".join(json.dumps(case) for case in (CHAT, {"id": "p", "prompt": "x"})) + "\n\n"
    by_line = load_suite(write(tmp_path, "cases.jsonl", lines))
    assert by_line.name == "cases" and len(by_line.cases) == 2
    assert by_line.max_regression == 0.02 and by_line.min_success is None
    assert tuple(by_line.refusal_markers) == DEFAULT_REFUSAL_MARKERS
    assert by_line.cases[0].max_tokens == 128 and by_line.cases[0].temperature == 0


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"cases": []}, "cases"),
        ({"cases": [CHAT, CHAT]}, "appears twice"),
        ({"cases": [{**CHAT, "prompt": "x"}]}, "either `messages`"),
        ({"cases": [{"id": "none"}]}, "either `messages`"),
        (
            {"cases": [{**CHAT, "checks": [{"type": "regex", "pattern": "("}]}]},
            "regular expression",
        ),
        ({"cases": [{**CHAT, "checks": [{"type": "telepathy"}]}]}, "telepathy"),
        ({"cases": [{**CHAT, "id": "bad id"}]}, "id"),
        ({"name": "a\u0000b", "cases": [CHAT]}, "name"),
        ({"cases": [{**CHAT, "slice": "x\ny"}]}, "slice"),
        ({"cases": [{**CHAT, "temperature": 3}]}, "temperature"),
        (
            {
                "cases": [
                    {**CHAT, "checks": [{"type": "json_schema", "schema": {"title": "\ud800"}}]}
                ]
            },
            "lone surrogate",
        ),
        ({"cases": [CHAT], "max_regression": 1.5}, "max_regression"),
        ({"cases": [CHAT], "surprise": 1}, "surprise"),
        (
            {
                "cases": [
                    {
                        **CHAT,
                        "sentinel": True,
                        "checks": [
                            {"type": "equals", "text": "a"},
                            {"type": "equals", "text": "b"},
                        ],
                    }
                ]
            },
            "one answer",
        ),
    ],
)
def test_a_suite_that_does_not_validate_is_refused_naming_what(tmp_path, data, says):
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(SuiteError) as refused:
        load_suite(path)
    assert str(path) in str(refused.value) and says in str(refused.value)


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("nan.json", '{"cases": [{"id": "a", "prompt": "x", "temperature": NaN}]}', "NaN"),
        ("broken.json", "{", "not valid JSON"),
        ("broken.jsonl", '{"id": "a", "prompt": "x"}\n{', "not valid JSON"),
    ],
)
def test_text_that_is_not_strict_json_is_refused(tmp_path, name, text, says):
    with pytest.raises(SuiteError, match=says):
        load_suite(write(tmp_path, name, text))


def test_a_missing_or_binary_file_is_refused(tmp_path):
    with pytest.raises(SuiteError, match="No such file"):
        load_suite(tmp_path / "absent.json")
    binary = tmp_path / "weights.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SuiteError, match="utf-8"):
        load_suite(binary)


def test_a_sentinels_pin_is_its_equals_check():
    from gateway.evals.suite import Case

    pinned = Case.model_validate(
        {**CHAT, "sentinel": True, "checks": [{"type": "equals", "text": "hello"}]}
    )
    assert pinned.pinned == "hello"
    assert Case.model_validate({**CHAT, "sentinel": True}).pinned is None
    # Not a sentinel: an equals check is a plain check.
    assert Case.model_validate({**CHAT, "checks": [{"type": "equals", "text": "x"}]}).pinned is None
