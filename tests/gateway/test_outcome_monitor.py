"""Feedback verdicts judge a canary or an armed stable: a safety incident at once, task success
over a full window; only the owner's routed responses count, and a restarted canary starts a
new window."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.outcome_monitor import Outcome, OutcomeFigures, OutcomeWindows, judge_task_success
from gateway.rollback_monitor import Verdict
from gateway.rollout_controller import RolloutController
from registry import service
from registry.compat.problems import Problem, ProblemCode
from registry.errors import RollbackRefused
from registry.rollout import RolloutChange, Thresholds
from tests.gateway.test_rollout_controller import CANARY, SHADOW, Router, controller

WINDOW = 20  # CANARY's thresholds (tests/gateway/test_rollout_controller.py)
STABLE_ARMED = dataclasses.replace(
    SHADOW, shadow_version=None, shadow_percent=0, auto_fallback=True
)


def feed(
    made, version: int, outcomes: list[Outcome], *, judged: bool = True, tag: int | None = None
) -> None:
    """Feedback on responses served in the version's current role (or the role `tag`)."""
    role_tag = made.role_tag("bot", version) if tag is None else tag
    for i, outcome in enumerate(outcomes):
        made.feedback("bot", version, outcome, f"id-{i}", judged=judged, role_tag=role_tag)


def test_a_window_is_judged_only_when_full_and_below_the_minimum():
    windows = OutcomeWindows()
    for _ in range(9):
        figures = windows.record("k", False, 10)
        assert not windows.full("k")
    figures = windows.record("k", True, 10)
    assert windows.full("k") and figures == OutcomeFigures(10, 0.1)
    verdict = judge_task_success(figures, 0.9)
    assert verdict is not None and verdict.reason == "task_success"
    assert verdict.figures.as_dict() == {"feedback": 10, "task_success_rate": 0.1}
    assert judge_task_success(OutcomeFigures(10, 0.9), 0.9) is None  # at the minimum holds
    assert judge_task_success(OutcomeFigures(10, 0.0), None) is None  # no minimum: never


def test_a_safety_incident_takes_the_canary_back_at_once():
    made, spawned = controller(Router(CANARY), auto_promote=False)
    feed(made, 3, [Outcome.SAFETY_INCIDENT])
    assert spawned == ["take_back"]


def test_task_failures_take_the_canary_back_after_a_full_window():
    made, spawned = controller(Router(CANARY), auto_promote=False)
    feed(made, 3, [Outcome.SUCCESS] * WINDOW)
    feed(made, 3, [Outcome.HUMAN_OVERRIDE, Outcome.SCHEMA_FAILURE] * 5)  # counted, not judged
    assert spawned == []
    feed(made, 3, [Outcome.FAILURE] * 2)  # 90 % of the window: holds
    assert spawned == []
    feed(made, 3, [Outcome.FAILURE])
    assert spawned == ["take_back"]


@pytest.mark.parametrize("outcome", [Outcome.SAFETY_INCIDENT, Outcome.FAILURE])
def test_unjudged_feedback_and_versions_with_nothing_to_fall_back_to_never_act(outcome):
    made, spawned = controller(Router(CANARY), auto_promote=False)
    feed(made, 3, [outcome] * WINDOW, judged=False)  # a tenant the adapter is shared with
    feed(made, 2, [outcome] * WINDOW)  # the canary's stable, unarmed
    assert spawned == []


def test_an_armed_stable_falls_back_on_an_incident():
    made, spawned = controller(Router(STABLE_ARMED), auto_promote=False)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    assert spawned == ["take_back"]


def test_feedback_on_a_response_served_before_the_canary_restarted_never_acts():
    """A report (or a client's late resend) about the canary before its rollback and restart
    took the restarted canary back again (found by review)."""
    router = Router(CANARY)
    made, spawned = controller(router, auto_promote=False)
    before = made.role_tag("bot", 3)
    feed(made, 3, [Outcome.FAILURE] * (WINDOW - 1))
    router.current = dataclasses.replace(CANARY, rolled_back_at="earlier")  # restarted
    assert made.role_tag("bot", 3) not in (before, 0)
    feed(made, 3, [Outcome.SAFETY_INCIDENT] + [Outcome.FAILURE] * WINDOW, tag=before)
    feed(made, 3, [Outcome.FAILURE] * (WINDOW - 1))  # a window of its own, not yet full
    assert spawned == []
    feed(made, 3, [Outcome.FAILURE])
    assert spawned == ["take_back"]


def test_role_tags_are_the_same_on_every_replica_and_zero_outside_a_role():
    made, _ = controller(Router(CANARY), auto_promote=False)
    other, _ = controller(Router(CANARY), auto_promote=False)
    assert made.role_tag("bot", 3) == other.role_tag("bot", 3) != 0
    assert made.role_tag("bot", 2) not in (0, made.role_tag("bot", 3))  # the stable's
    assert made.role_tag("bot", 7) == 0 and made.role_tag("", None) == 0


async def test_an_incident_during_a_refused_fallbacks_wait_is_retried_not_dropped(monkeypatch):
    """A safety incident is reported once: arriving while a refused fallback waits out its
    retry delay, it was dropped for good (found by review). It waits its turn now."""
    router = Router(STABLE_ARMED)
    made = RolloutController(
        types.SimpleNamespace(sessions=no_session),  # type: ignore[arg-type]
        router,  # type: ignore[arg-type]
        Thresholds(sla_p95_e2e_ms=100, window=WINDOW),
        fallback_retry_s=0.3,
    )
    reasons: list[str] = []
    called = asyncio.Event()

    async def rollback(_session: Any, **call: Any) -> RolloutChange:
        reasons.append(call["reason"])
        called.set()
        if len(reasons) == 1:
            raise RollbackRefused(
                [Problem(ProblemCode.ROLLBACK_TARGET_FAILING, "target breaching")]
            )
        return RolloutChange(view=router.current, acted=True, action="stable_fallback")

    monkeypatch.setattr(service, "rollback", rollback)
    latency = Verdict("latency_p95", OutcomeFigures(0, None), "p95 latency over the bound")
    await made._take_backs.take_back(STABLE_ARMED, 2, latency, stable=True)
    assert len(reasons) == 1  # refused: the next try waits 0.3 s
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    async with asyncio.timeout(3):
        while len(reasons) < 2:
            called.clear()
            await called.wait()
    assert "safety incident" in reasons[1]
    await made.close()


@contextlib.asynccontextmanager
async def no_session() -> AsyncIterator[None]:
    yield None


def call(made, version: int, valid: list[bool], *, judged: bool = True) -> None:
    role_tag = made.role_tag("bot", version)
    for ok in valid:
        made.tool_call("bot", version, ok, judged=judged, role_tag=role_tag)


def test_tool_calls_take_the_canary_back_after_a_full_window_under_the_minimum():
    made, spawned = controller(Router(CANARY), auto_promote=False)
    call(made, 3, [True] * WINDOW)
    call(made, 3, [False])  # 95 % of the window: holds
    assert spawned == []
    call(made, 3, [False], judged=False)  # a consumer's: never acts
    call(made, 2, [False] * WINDOW)  # the canary's stable, unarmed
    assert spawned == []
    call(made, 3, [False])
    assert spawned == ["take_back"]


def test_a_tool_call_verdict_names_its_figures_and_no_minimum_never_judges():
    from gateway.outcome_monitor import ToolCallFigures, judge_tool_calls

    verdict = judge_tool_calls(ToolCallFigures(100, 0.9), 0.95)
    assert verdict is not None and verdict.reason == "tool_calls"
    assert verdict.figures.as_dict() == {"tool_calls": 100, "tool_call_validity": 0.9}
    assert judge_tool_calls(ToolCallFigures(100, 0.95), 0.95) is None
    assert judge_tool_calls(ToolCallFigures(100, 0.0), None) is None
