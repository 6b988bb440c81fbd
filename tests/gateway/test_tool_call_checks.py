"""The judge of the calls a model writes under tool_choice "auto": JSON Schema semantics kept
(regular expressions run, under a timeout), and bounded work on the event loop: nothing
fetched, exploding schemas and backtracking patterns end unjudged, not in a stall."""

from __future__ import annotations

import json

import pytest

from gateway.services.tool_call_checks import CallChecker


def judged(parameters: dict, arguments: dict | str) -> str | None:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    return CallChecker([tool]).outcome("f", text)


def string_property(**schema) -> dict:
    return {"type": "object", "properties": {"s": {"type": "string", **schema}}}


@pytest.mark.parametrize(
    ("parameters", "arguments", "expected"),
    [
        (string_property(pattern="^a+$"), {"s": "aaa"}, "valid"),
        (string_property(pattern="^a+$"), {"s": "ab"}, "invalid_arguments"),
        # Regexes are run, not stripped: under not, oneOf and if they keep their meaning.
        (string_property(**{"not": {"pattern": "^x"}}), {"s": "abc"}, "valid"),
        (string_property(**{"not": {"pattern": "^x"}}), {"s": "xyz"}, "invalid_arguments"),
        (
            string_property(oneOf=[{"pattern": "^a"}, {"pattern": "^b"}]),
            {"s": "ax"},
            "valid",
        ),
        (
            {
                "type": "object",
                "if": {"properties": {"id": {"pattern": "^u"}}},
                "then": {"required": ["user"]},
            },
            {"id": "x1"},
            "valid",
        ),
        (
            {"type": "object", "properties": {"pattern": {"type": "string"}}},
            {"pattern": "p"},
            "valid",
        ),
        (string_property(), "[1]", "invalid_arguments"),
        (string_property(), "{broken", "invalid_arguments"),
        # Unjudged: a pattern that backtracks past the budget, patternProperties (jsonschema
        # runs those with Python's re inside other keywords), an invalid schema.
        (string_property(pattern="^(a|aa)+$"), {"s": "a" * 5000 + "b"}, None),
        ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, {"xa": 1}, None),
        ({"type": "object", "properties": {"s": {"type": 5}}}, {"s": 1}, None),
    ],
)
def test_the_judge_keeps_json_schema_semantics(parameters, arguments, expected):
    assert judged(parameters, arguments) == expected


def test_unknown_functions_and_tools_without_parameters():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert CallChecker(tools).outcome("g", "{}") == "unknown_function"
    assert CallChecker(tools).outcome("f", '{"any": 1}') == "valid"


def test_a_reference_outside_the_schema_is_never_fetched(monkeypatch):
    """jsonschema's default registry retrieves URLs (file:// too) with no timeout, on the
    event loop: one tenant's schema could stall every stream or read the gateway's files."""
    import urllib.request

    fetched = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: fetched.append(a))
    for ref in ("http://127.0.0.1:9/s.json", "file:///etc/hostname"):
        assert judged({"type": "object", "properties": {"s": {"$ref": ref}}}, {"s": 1}) is None
    assert fetched == []


def exploding(depth: int) -> dict:
    """Each level anyOf two references to the next: 2**depth paths to a tiny argument."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def test_work_that_explodes_ends_unjudged_within_the_budget():
    assert judged(exploding(3), {"x": "s"}) == "valid"  # references inside the schema resolve
    assert judged(exploding(3), {"x": 1}) == "invalid_arguments"
    # Unbounded, depth 20 took 137 s of the event loop (found by review).
    assert judged(exploding(20), {"x": 1}) is None


def test_a_schema_nested_past_the_interpreter_s_limit_is_unjudged_not_an_error():
    schema: dict = {"type": "object"}
    for _ in range(2000):
        schema = {"anyOf": [schema]}
    assert judged(schema, {"a": 1}) is None
