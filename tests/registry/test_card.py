from __future__ import annotations

import json
from typing import Any

import pytest

from registry.card import parse_card
from registry.compat.problems import ProblemCode

VALID: dict[str, Any] = {
    "owner": "ml-platform@acme",
    "alert_id": "AI-INFRA-SEV1",
    "objective": "sft",
    "base_sha256": "sha256:" + "0" * 64,
    "merge_policy": "dynamic",
    "stacking": {"mode": "allow_listed", "with_objectives": ["safety_guardrail"]},
    "rollback_path": "extractor@2",
    "sla": {"p95_ttft_ms": 85, "concurrency": 32},
    "rollback": {"p95_ttft_abs_ms": 120, "margin_ms": 15, "error_rate": 0.001},
    "datasets": [{"name": "pairs", "sha256": "a" * 64, "rows": 42500, "license": "COMMERCIAL_OK"}],
    "evals": [{"name": "held-out", "metric": "json_valid", "value": 1.0, "passed": True}],
    "licenses": ["COMMERCIAL_OK"],
    "training": {"lr": 2e-4, "epochs": 3, "framework": "peft 0.21"},
}


def test_valid_card_is_normalised():
    card, problems = parse_card(VALID)
    assert problems == [] and card is not None
    assert card.base_sha256 == "0" * 64  # prefix stripped
    assert card.rollback is not None and card.rollback.window_requests == 100  # default
    assert parse_card(json.dumps(VALID))[0] == card


def test_no_card_is_fine():
    assert parse_card(None) == (None, [])


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown field", {"signed_by": "me"}, "signed_by"),
    ("unknown nested field", {"sla": {"p99_ms": 3}}, "sla.p99_ms"),
    ("negative threshold", {"rollback": {"p95_ttft_abs_ms": -1}}, "rollback.p95_ttft_abs_ms"),
    ("error rate above 1", {"rollback": {"error_rate": 1.5}}, "rollback.error_rate"),
    (
        "tool-call validity above 1",
        {"rollback": {"tool_call_validity_min": 1.5}},
        "rollback.tool_call_validity_min",
    ),
    ("bad objective", {"objective": "vibes"}, "objective"),
    ("bad dataset hash", {"datasets": [{"name": "d", "sha256": "abc"}]}, "datasets.0.sha256"),
    ("traversal rollback", {"rollback_path": "../x"}, "rollback_path"),
    ("margin without sla", {"sla": None, "rollback": {"margin_ms": 15}}, "relative to an SLA"),
    ("inf eval", {"evals": [{"name": "a", "metric": "b", "value": float("inf")}]}, "evals.0.value"),
    (
        "exclusive with list",
        {"stacking": {"mode": "exclusive", "with_adapters": ["x"]}},
        "stacking",
    ),
    ("missing owner", {"owner": None}, "owner"),
]


@pytest.mark.parametrize(("case", "change", "needle"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_cards(case: str, change: dict[str, Any], needle: str):
    card, problems = parse_card({**VALID, **change})
    assert card is None and problems
    assert all(p.code == ProblemCode.CARD_INVALID for p in problems)
    assert any(needle in p.message for p in problems), [p.message for p in problems]


def test_all_card_errors_are_reported():
    _, problems = parse_card({**VALID, "owner": "", "objective": "x", "extra": 1})
    assert len(problems) == 3


def test_non_json_text():
    assert parse_card("{nope")[1][0].code == ProblemCode.CARD_INVALID


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("sla.p95_ttft_ms", "NaN"),  # a float field: without the rule NaN would be a float
        ("rollback.error_rate", "Infinity"),
        ("training.lr", "-Infinity"),  # free-form: any scalar is welcome, but not these
        ("evals.0.value", "NaN"),
    ],
)
def test_nan_and_infinity_in_card_text_name_the_field(field: str, literal: str):
    document: dict[str, Any] = json.loads(json.dumps(VALID))
    *parents, last = field.split(".")
    target: Any = document
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = "__constant__"
    text = json.dumps(document).replace('"__constant__"', literal)
    card, problems = parse_card(text)
    assert card is None
    assert [(p.code, p.message) for p in problems] == [
        (
            ProblemCode.CARD_INVALID,
            f"card.{field}: {literal} is not allowed (JSON has no NaN or Infinity)",
        )
    ]


def test_deeply_nested_card_text_is_refused_not_raised():
    problems = parse_card("[" * 100_000 + "]" * 100_000)[1]
    assert [p.message for p in problems] == ["card JSON is nested too deeply"]
