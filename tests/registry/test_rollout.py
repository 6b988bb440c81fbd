"""The pure rollout rules: the stage ladder, sticky caller assignment (distribution,
monotonicity, stickiness, independence across adapters), threshold precedence, and how a
RolloutView routes a caller."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from typing import Any

import pytest

from registry.errors import InvalidThresholds
from registry.rollout import (
    STAGES,
    RolloutView,
    Route,
    Thresholds,
    assign,
    bucket,
    card_limits,
    effective_thresholds,
    next_stage,
    validate_threshold_override,
)

KEYS = [f"key-{i}" for i in range(20_000)]


@pytest.mark.parametrize(("current", "following"), [(1, 10), (10, 50), (50, 100)])
def test_next_stage(current: int, following: int):
    assert next_stage(current) == following


@pytest.mark.parametrize("percent", [100, 0, 5, 99])
def test_next_stage_refuses_the_end_and_off_ladder(percent: int):
    with pytest.raises(ValueError):
        next_stage(percent)


def test_bucket_is_the_documented_hash():
    digest = hashlib.sha256(b"acme-support\x00caller-1").digest()
    assert bucket("caller-1", "acme-support") == int.from_bytes(digest[:8], "big") % 10_000
    assert assign("caller-1", "acme-support", 50) is (bucket("caller-1", "acme-support") < 5_000)


@pytest.mark.parametrize("percent", STAGES)
def test_assignment_share_matches_the_percent(percent: int):
    share = sum(assign(key, "acme-support", percent) for key in KEYS) / len(KEYS)
    # 20 000 fixed keys: the binomial standard deviation is ≤ 0.36 %; allow 5 of them.
    tolerance = 5 * (percent / 100 * (1 - percent / 100) / len(KEYS)) ** 0.5
    assert abs(share - percent / 100) <= tolerance


def test_assignment_is_monotone_in_the_percent():
    for key in KEYS[:2_000]:
        answers = [assign(key, "acme-support", p) for p in range(101)]
        # Once in, in at every higher percent: the answers are False…False True…True.
        assert answers == sorted(answers), key
    # In particular along the ladder: nobody in the canary at 10 % is out of it at 50 %.
    in_at_10 = {k for k in KEYS if assign(k, "acme-support", 10)}
    assert in_at_10 and all(assign(k, "acme-support", 50) for k in in_at_10)


def test_assignment_is_sticky_and_independent_across_adapters():
    first = [assign(k, "acme-support", 10) for k in KEYS]
    assert first == [assign(k, "acme-support", 10) for k in KEYS]  # same answer every time
    other = [assign(k, "acme-billing", 10) for k in KEYS]
    both = sum(a and b for a, b in zip(first, other, strict=True)) / len(KEYS)
    assert abs(both - 0.01) < 0.004  # ≈ 10 % of 10 %: not the same callers for every adapter


@pytest.mark.parametrize("percent", [-1, 101])
def test_assign_refuses_impossible_percents(percent: int):
    with pytest.raises(ValueError):
        assign("k", "a", percent)


def test_zero_and_hundred_percent():
    assert not any(assign(k, "a", 0) for k in KEYS[:1000])
    assert all(assign(k, "a", 100) for k in KEYS[:1000])


# ------------------------------------------------------------------------------ thresholds

DEFAULTS = Thresholds(window=200, max_error_rate=0.01, margin_ms=10.0)
CARD = {
    "sla": {"p95_ttft_ms": 85.0, "p95_e2e_ms": None, "concurrency": None},
    "rollback": {
        "p95_ttft_abs_ms": None,
        "p95_e2e_abs_ms": 900.0,
        "margin_ms": 15.0,
        "error_rate": 0.001,
        "window_requests": 100,
    },
    "owner": "ml@acme",
}


@pytest.mark.parametrize(
    ("card", "override", "expected"),
    [
        pytest.param(None, None, {}, id="defaults-only"),
        pytest.param({"sla": {"p95_e2e_ms": 500}}, None, {"sla_p95_e2e_ms": 500}, id="card-sla"),
        pytest.param(
            CARD,
            None,
            {
                "window": 100,
                "max_error_rate": 0.001,
                "sla_p95_ttft_ms": 85.0,
                "margin_ms": 15.0,
                "max_p95_e2e_ms": 900.0,
            },
            id="card-everything",
        ),
        pytest.param(
            CARD,
            {"margin_ms": 30, "window": 500},
            {
                "window": 500,
                "max_error_rate": 0.001,
                "sla_p95_ttft_ms": 85.0,
                "margin_ms": 30,
                "max_p95_e2e_ms": 900.0,
            },
            id="override-beats-card",
        ),
        pytest.param(
            CARD,
            {"sla_p95_ttft_ms": None, "max_p95_e2e_ms": None},
            {"window": 100, "max_error_rate": 0.001, "margin_ms": 15.0},
            id="override-null-removes-card-bounds",
        ),
        pytest.param(
            None,
            {"max_p95_ttft_ms": 250},
            {"max_p95_ttft_ms": 250},
            id="override-over-defaults",
        ),
        pytest.param(
            {"rollback": {"margin_ms": None, "window_requests": 100}},
            None,
            {"window": 100},
            id="card-nulls-keep-defaults",
        ),
    ],
)
def test_threshold_precedence(
    card: dict[str, Any] | None, override: dict[str, Any] | None, expected: dict[str, Any]
):
    assert effective_thresholds(card, override, DEFAULTS) == replace(DEFAULTS, **expected)
    # The view stores only the card's sla/rollback part; it judges the same.
    assert effective_thresholds(card_limits(card), override, DEFAULTS) == replace(
        DEFAULTS, **expected
    )


def test_thresholds_convert_to_the_gateway_window_limits():
    from gateway.rollback_monitor import WindowLimits

    limits = WindowLimits(**asdict(effective_thresholds(CARD, {"window": 50}, Thresholds())))
    assert (limits.window, limits.sla_p95_ttft_ms, limits.max_p95_e2e_ms) == (50, 85.0, 900.0)


def test_override_validation_keeps_only_the_given_keys():
    assert validate_threshold_override({"margin_ms": 5, "sla_p95_e2e_ms": None}) == {
        "margin_ms": 5.0,
        "sla_p95_e2e_ms": None,
    }
    assert validate_threshold_override({}) == {}


def test_override_validation_lists_every_problem():
    with pytest.raises(InvalidThresholds) as refused:
        validate_threshold_override(
            {"window": 5, "max_error_rate": 1.5, "margin_ms": "10", "p95": 3, "window_x": True}
        )
    joined = " | ".join(refused.value.problems)
    assert len(refused.value.problems) == 5
    for key in ("window", "max_error_rate", "margin_ms", "p95", "window_x"):
        assert key in joined
    with pytest.raises(InvalidThresholds):
        validate_threshold_override({"window": None})  # only SLAs and bounds can be removed
    with pytest.raises(InvalidThresholds):
        validate_threshold_override({"max_p95_e2e_ms": float("inf")})


# ------------------------------------------------------------------------------ the view


def view(**changes: Any) -> RolloutView:
    fields: dict[str, Any] = {
        "name": "acme-support",
        "tenant": "acme",
        "base_model": "tiny",
        "base_sha256": "00" * 32,
        "stable_version": 1,
        "stable_version_id": 11,
        "canary_version": None,
        "canary_version_id": None,
        "canary_percent": 0,
        "shadow_version": None,
        "shadow_version_id": None,
        "shadow_percent": 0,
        "paused": False,
        "stage": None,
        "rollback_target": "base",
        "active_target": None,
        "auto_fallback": False,
        "rolled_back_version": None,
        "rolled_back_at": None,
        "updated_at": None,
        "stable_card": None,
        "canary_card": None,
        "shadow_card": None,
        "threshold_override": None,
    }
    return RolloutView(**{**fields, **changes})


def test_route_without_a_rollout_is_the_stable():
    assert view().route("anyone") == Route("acme-support@1", "stable", 1, 11)
    assert view(stable_version=None, stable_version_id=None).route("anyone") is None


@pytest.mark.parametrize("paused", [False, True])
def test_route_splits_by_assignment_and_pause_keeps_the_split(paused: bool):
    canary = view(canary_version=2, canary_version_id=12, canary_percent=10, paused=paused)
    routes = [canary.route(k) for k in KEYS[:5000]]
    to_canary = [r for r in routes if r is not None and r.role == "canary"]
    assert all(r == Route("acme-support@2", "canary", 2, 12) for r in to_canary)
    assert 0.08 < len(to_canary) / len(routes) < 0.12
    for key, route in zip(KEYS, routes, strict=False):
        assert (route is not None and route.role == "canary") == assign(key, "acme-support", 10)


def test_route_in_fallback_sends_the_stable_share_to_the_target():
    fallback = view(active_target="base", canary_version=2, canary_version_id=12, canary_percent=1)
    roles = {r.role for k in KEYS[:2000] if (r := fallback.route(k)) is not None}
    assert roles == {"canary", "fallback"}
    outside = next(k for k in KEYS if not assign(k, "acme-support", 1))
    assert fallback.route(outside) == Route("base", "fallback")


def test_view_thresholds_use_each_versions_card():
    both = view(
        canary_version=2,
        canary_percent=10,
        stable_card={"sla": {"p95_ttft_ms": 100}},
        canary_card={"sla": {"p95_ttft_ms": 80}},
        threshold_override={"margin_ms": 5},
    )
    assert both.thresholds(1, Thresholds()).sla_p95_ttft_ms == 100
    assert both.thresholds(2, Thresholds()).sla_p95_ttft_ms == 80
    assert both.thresholds(7, Thresholds()) == Thresholds(margin_ms=5)


def shadowed(percent: int, **changes: Any) -> RolloutView:
    return view(shadow_version=3, shadow_version_id=13, shadow_percent=percent, **changes)


def test_shadow_share_is_sticky_monotone_and_independent_of_the_canary():
    for percent in (1, 10, 50):
        share = sum(shadowed(percent).in_shadow(k) for k in KEYS) / len(KEYS)
        assert abs(share - percent / 100) < 0.02, (percent, share)
    inside = [k for k in KEYS if shadowed(10).in_shadow(k)]
    assert inside == [k for k in KEYS if shadowed(10).in_shadow(k)]  # sticky
    assert all(shadowed(50).in_shadow(k) for k in inside)  # monotone
    assert all(shadowed(100).in_shadow(k) for k in KEYS)
    # Another namespace than the canary's: at 10 % each, the overlap is ~1 %, not ~10 %.
    both = sum(1 for k in inside if assign(k, "acme-support", 10))
    assert both / len(KEYS) < 0.03
    assert not view().in_shadow(KEYS[0]) and not view().shadow_running


def test_shadow_route_mirrors_only_what_the_stable_serves():
    plain = shadowed(100)
    assert plain.watched and not plain.steers  # kept by replicas, routing unchanged
    assert plain.route(KEYS[0]) == Route("acme-support@1", "stable", 1, 11)
    assert plain.shadow_route(KEYS[0]) == Route("acme-support@3", "shadow", 3, 13)
    with_canary = shadowed(100, canary_version=2, canary_version_id=12, canary_percent=50)
    for key in KEYS[:500]:
        served = with_canary.route(key)
        mirrored = with_canary.shadow_route(key)
        assert (mirrored is not None) == (served is not None and served.role == "stable")
    assert shadowed(100, active_target="base").shadow_route(KEYS[0]) is None
    outside = next(k for k in KEYS if not shadowed(10).in_shadow(k))
    assert shadowed(10).shadow_route(outside) is None
    assert view().shadow_route(KEYS[0]) is None


def test_shadow_thresholds_use_its_card():
    candidate = shadowed(10, shadow_card={"sla": {"p95_ttft_ms": 70}})
    assert candidate.thresholds(3, Thresholds()).sla_p95_ttft_ms == 70
    assert candidate.thresholds(1, Thresholds()).sla_p95_ttft_ms is None


def test_the_task_success_minimum_comes_from_the_card_the_override_or_the_defaults():
    card = {"rollback": {"task_success_min": 0.8, "window_requests": 100}}
    assert effective_thresholds(card, None, DEFAULTS).min_task_success == 0.8
    assert effective_thresholds(card, {"min_task_success": 0.95}, DEFAULTS).min_task_success == 0.95
    # An explicit null: feedback only counts, it never rolls this adapter back.
    assert effective_thresholds(card, {"min_task_success": None}, DEFAULTS).min_task_success is None
    assert effective_thresholds(None, None, DEFAULTS).min_task_success == 0.9
    with pytest.raises(InvalidThresholds):
        validate_threshold_override({"min_task_success": 1.5})


def test_the_tool_call_validity_minimum_comes_from_the_card_the_override_or_the_defaults():
    card = {"rollback": {"tool_call_validity_min": 0.8, "window_requests": 100}}
    assert effective_thresholds(card, None, DEFAULTS).min_tool_call_validity == 0.8
    override = {"min_tool_call_validity": 0.99}
    assert effective_thresholds(card, override, DEFAULTS).min_tool_call_validity == 0.99
    off = {"min_tool_call_validity": None}
    assert effective_thresholds(card, off, DEFAULTS).min_tool_call_validity is None
    assert effective_thresholds(None, None, DEFAULTS).min_tool_call_validity == 0.95
    with pytest.raises(InvalidThresholds):
        validate_threshold_override({"min_tool_call_validity": 1.5})
