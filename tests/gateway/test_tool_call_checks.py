"""The judge of the calls a model writes under tool_choice "auto": the keywords that describe
a call's shape are checked, every other one only ever towards "valid", and the work is bounded
(one request's steps), since it runs a client's schema on the event loop every stream shares:
nothing fetched, no regular expression run, exploding schemas end unjudged."""

from __future__ import annotations

import json

import pytest

from gateway.services.tool_call_checks import JUDGE_STEPS, CallChecker


def judged(parameters: dict, arguments: dict | str) -> str | None:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    return CallChecker([tool]).outcome("f", text)


def prop(**schema) -> dict:
    return {"type": "object", "properties": {"s": schema}}


CHECKED = [
    (prop(type="string"), {"s": "a"}, "valid"),
    (prop(type="string"), {"s": 1}, "invalid_arguments"),
    (prop(type="integer"), {"s": 1.0}, "valid"),  # JSON Schema: 1.0 is an integer
    (prop(type="integer"), {"s": True}, "invalid_arguments"),  # a boolean is not
    (prop(type=["string", "null"]), {"s": None}, "valid"),
    (prop(enum=["a", 1]), {"s": 1.0}, "valid"),
    (prop(enum=[1]), {"s": True}, "invalid_arguments"),
    (prop(const={"k": [1]}), {"s": {"k": [1]}}, "valid"),
    (prop(minimum=1, exclusiveMaximum=3), {"s": 3}, "invalid_arguments"),
    (prop(minLength=2, maxLength=3), {"s": "abcd"}, "invalid_arguments"),
    (prop(items={"type": "integer"}, minItems=1), {"s": [1, "x"]}, "invalid_arguments"),
    (prop(prefixItems=[{"type": "string"}], items=False), {"s": ["a", 1]}, "invalid_arguments"),
    (prop(items=[{"type": "string"}], additionalItems=False), {"s": ["a"]}, "valid"),  # draft 7
    ({"type": "object", "required": ["s"]}, {}, "invalid_arguments"),
    ({"type": "object", "additionalProperties": False}, {"x": 1}, "invalid_arguments"),
    ({"type": "object", "maxProperties": 1}, {"x": 1, "y": 2}, "invalid_arguments"),
    (prop(anyOf=[{"type": "string"}, {"type": "integer"}]), {"s": 2}, "valid"),
    (prop(allOf=[{"type": "integer"}, {"minimum": 5}]), {"s": 2}, "invalid_arguments"),
    (
        {
            "type": "object",
            "properties": {"s": {"$ref": "#/$defs/d"}},
            "$defs": {"d": {"type": "string"}},
        },
        {"s": 1},
        "invalid_arguments",
    ),
    (
        {"properties": {"s": {"$ref": "#/definitions/d"}}, "definitions": {"d": {"enum": [1]}}},
        {"s": 1},
        "valid",
    ),
    (prop(type="string"), "[1]", "invalid_arguments"),  # not an object
    (prop(type="string"), "{broken", "invalid_arguments"),
    (prop(type="number"), '{"s": NaN}', "invalid_arguments"),  # strict JSON has no NaN
    (prop(type="integer", maximum=10), '{"s": ' + "9" * 400 + "}", "invalid_arguments"),
    (prop(type="integer", minimum=10), '{"s": ' + "9" * 400 + "}", "valid"),  # no overflow
    ({"type": "object", "properties": {"pattern": {"type": "string"}}}, {"pattern": "p"}, "valid"),
]

NOT_CHECKED = [
    # No regular expression is run (jsonschema's could take the machine's memory: a{4294967294}).
    (prop(pattern="^a+$"), {"s": "b"}),
    (prop(pattern="^a{4294967294}$"), {"s": "a"}),
    # Keywords that could only wrongly fail with looser branches: skipped or read as anyOf.
    (prop(**{"not": {"pattern": "^x"}}), {"s": "xyz"}),
    (prop(oneOf=[{"type": "string"}, {"type": "string"}]), {"s": "a"}),
    ({"if": {"properties": {"s": {"const": 1}}}, "then": {"required": ["t"]}}, {"s": 1}),
    # patternProperties may admit what additionalProperties false would refuse.
    (
        {"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False},
        {"xa": 1},
    ),
    # Looser rules of older drafts, and OpenAPI's nullable.
    (
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "properties": {"s": {"$ref": "#/definitions/a", "type": "string"}},
            "definitions": {"a": {"type": "integer"}},
        },
        {"s": 1},
    ),
    (
        {
            "$schema": "https://json-schema.org/draft/2019-09/schema",
            "properties": {
                "s": {"prefixItems": [{"type": "string"}], "items": {"type": "integer"}}
            },
        },
        {"s": [1]},
    ),
    (prop(type="string", nullable=True), {"s": None}),
    # Quadratic or exploding in jsonschema: uniqueItems, unevaluated*, $dynamicRef.
    (prop(type="array", uniqueItems=True), {"s": ["x", *range(6000)]}),
    (
        {
            "type": "object",
            "unevaluatedProperties": False,
            "$ref": "#/$defs/d0",
            "$defs": {f"d{i}": {"$dynamicRef": f"#/$defs/d{i + 1}"} for i in range(30)},
        },
        {"x": 1},
    ),
]


@pytest.mark.parametrize(("parameters", "arguments", "expected"), CHECKED)
def test_the_keywords_of_a_call_s_shape_are_checked(parameters, arguments, expected):
    assert judged(parameters, arguments) == expected


@pytest.mark.parametrize(("parameters", "arguments"), NOT_CHECKED)
def test_other_keywords_never_make_a_call_invalid(parameters, arguments):
    assert judged(parameters, arguments) == "valid"


def test_unknown_functions_and_tools_without_parameters():
    checker = CallChecker([{"type": "function", "function": {"name": "f"}}])
    assert checker.outcome("g", "{}") == "unknown_function"
    assert checker.outcome("f", '{"any": 1}') == "valid"


def test_a_reference_outside_the_schema_is_unjudged_and_never_fetched(monkeypatch):
    import urllib.request

    fetched = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: fetched.append(a))
    refs = [
        "http://127.0.0.1:9/s.json",
        "file:///etc/hostname",
        "#/$defs/missing",
        "#foo",  # an anchor
        "#/allOf/²",  # isdigit, but no index
        "#/allOf/" + "1" * 5000,
    ]
    for ref in refs:
        schema = {"type": "object", "allOf": [{}, {}], "properties": {"s": {"$ref": ref}}}
        assert judged(schema, {"s": 1}) is None, ref
    assert fetched == []
    # Inside an embedded resource ($id) a pointer resolves from it, not from the root.
    embedded = {
        "type": "object",
        "properties": {"s": {"$ref": "#/$defs/b"}},
        "$defs": {
            "b": {"$id": "https://example.com/b", "$ref": "#/$defs/c", "$defs": {"c": {}}},
            "c": {"type": "integer"},
        },
    }
    assert judged(embedded, {"s": "a"}) is None


@pytest.mark.parametrize("arguments", ['{"s": 1e400}', '{"s": ' + "1" * 5000 + "}"])
def test_json_numbers_python_cannot_hold_are_unjudged(arguments):
    assert judged(prop(type="number"), arguments) is None


def test_long_lists_in_the_schema_cost_their_length():
    """required and type lists, and long pointers, were one step however long (review: 21 s
    of CPU from a 0.34 MB schema)."""
    many = {"required": ["a"] * 40_000, "maxProperties": 0}
    schema = {
        "type": "object",
        "properties": {"s": {"anyOf": [{"$ref": "#/$defs/r"}] * 6000}},
        "$defs": {"r": many},
    }
    assert judged(schema, {"s": {"a": 1}}) is None


def exploding(depth: int) -> dict:
    """Each level anyOf two references to the next: 2**depth paths when every one fails."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def test_one_request_s_checks_share_a_bounded_number_of_steps():
    """jsonschema took 137 s of the event loop on exploding(20), per call (found by review)."""
    assert judged(exploding(3), {"x": "s"}) == "valid"
    assert judged(exploding(3), {"x": 1}) == "invalid_arguments"
    assert judged(exploding(30), {"x": "s"}) == "valid"  # the first path holds
    tool = {"type": "function", "function": {"name": "f", "parameters": exploding(30)}}
    checker = CallChecker([tool])
    assert checker.outcome("f", '{"x": 1}') is None  # every path fails: over the steps
    # The request's steps are spent: its later calls are unjudged without any work.
    assert checker.outcome("f", '{"x": "s"}') is None
    big_enum = prop(enum=[{"k": list(range(100))}] * (JUDGE_STEPS // 50))
    near = {"s": {"k": [*range(99), -1]}}  # compared to its last node with every member
    assert judged(big_enum, near) is None  # each node compared is a step


def test_a_schema_nested_past_the_interpreter_s_limit_is_unjudged_not_an_error():
    schema: dict = {"type": "object"}
    for _ in range(5000):
        schema = {"allOf": [schema]}
    assert judged(schema, {"a": 1}) is None
