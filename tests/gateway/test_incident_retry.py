"""A safety incident is reported once, so the controller never drops it while its version keeps
the role it was served in: retried after its own refused fallback, after failures that are no
outage, when it arrives while another action runs; about a newer role it replaces an older
one's; and one retry loop per version, honouring the wait after a refusal (found by review:
two loops doubled the registry calls and skipped the wait)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import types
from typing import Any

from gateway.outcome_monitor import Outcome, OutcomeFigures
from gateway.rollback_monitor import Verdict
from gateway.rollout_controller import RolloutController
from gateway.rollout_takeback import MAX_ACTION_ATTEMPTS
from registry import service
from registry.compat.problems import Problem, ProblemCode
from registry.errors import RollbackRefused
from registry.rollout import RolloutChange, Thresholds
from tests.gateway.test_outcome_monitor import STABLE_ARMED, feed, no_session
from tests.gateway.test_rollout_controller import Router

REFUSED = RollbackRefused([Problem(ProblemCode.ROLLBACK_TARGET_FAILING, "target breaching")])
LATENCY = Verdict("latency_p95", OutcomeFigures(0, None), "p95 latency over the bound")


def make(router: Router, *, fallback_retry_s: float = 0.3) -> RolloutController:
    return RolloutController(
        types.SimpleNamespace(sessions=no_session),  # type: ignore[arg-type]
        router,  # type: ignore[arg-type]
        Thresholds(sla_p95_e2e_ms=100, window=20),
        fallback_retry_s=fallback_retry_s,
        action_retry_s=0.02,
    )


class Registry:
    """service.rollback as the controller meets it: each call answers from `answers` in turn
    (an exception is raised), then the fallback succeeds."""

    def __init__(self, router: Router, answers: list[BaseException], hold_s: float = 0.0):
        self.router = router
        self.answers = list(answers)
        self.hold_s = hold_s
        self.calls: list[tuple[float, str]] = []
        self.succeeded = asyncio.Event()
        self.started = time.monotonic()

    async def rollback(self, _session: Any, **call: Any) -> RolloutChange:
        self.calls.append((time.monotonic() - self.started, call["reason"]))
        await asyncio.sleep(self.hold_s)
        if self.answers:
            raise self.answers.pop(0)
        self.succeeded.set()
        return RolloutChange(view=self.router.current, acted=True, action="stable_fallback")


async def settled(made: RolloutController, registry: Registry, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        await registry.succeeded.wait()
    await made.close()


async def test_an_incident_whose_own_fallback_is_refused_is_retried_after_the_wait(monkeypatch):
    router = Router(STABLE_ARMED)
    made, registry = make(router), Registry(router, [REFUSED])
    monkeypatch.setattr(service, "rollback", registry.rollback)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await settled(made, registry)
    [(_, first), (after_s, second)] = registry.calls
    assert "safety incident" in first and "safety incident" in second
    assert after_s >= 0.3  # the wait after a refusal held


async def test_an_incident_outlasts_failures_that_are_no_outage(monkeypatch):
    router = Router(STABLE_ARMED)
    failures = [RuntimeError("a bug")] * (MAX_ACTION_ATTEMPTS + 2)
    made, registry = make(router), Registry(router, failures)
    monkeypatch.setattr(service, "rollback", registry.rollback)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await settled(made, registry)
    assert len(registry.calls) == MAX_ACTION_ATTEMPTS + 3


async def test_an_incident_reported_while_a_latency_call_fails_takes_its_place(monkeypatch):
    router = Router(STABLE_ARMED)
    made, registry = make(router), Registry(router, [RuntimeError("a bug")], hold_s=0.1)
    monkeypatch.setattr(service, "rollback", registry.rollback)
    acting = asyncio.ensure_future(
        made._take_backs.take_back(STABLE_ARMED, 2, LATENCY, stable=True)
    )
    await asyncio.sleep(0.02)  # the latency call is in flight
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await acting
    await settled(made, registry)
    assert [reason for _, reason in registry.calls] == [LATENCY.detail, registry.calls[1][1]]
    assert "safety incident" in registry.calls[1][1]


async def test_incidents_reported_together_keep_one_retry_loop_and_its_wait(monkeypatch):
    router = Router(STABLE_ARMED)
    made, registry = make(router), Registry(router, [REFUSED] * 100, hold_s=0.02)
    monkeypatch.setattr(service, "rollback", registry.rollback)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await asyncio.sleep(0.005)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])  # while the first call is in flight
    await asyncio.sleep(1.5)
    await made.close()
    times = [at for at, _ in registry.calls]
    assert len(times) <= 1 + 1.5 / 0.3, times
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(times)), times


async def test_an_incident_about_a_newer_role_replaces_the_waiting_one(monkeypatch):
    """Stable v2's incident waits out a refused fallback; meanwhile the stable fell back and was
    restored (a new role), and an incident comes in on the restored stable: it is taken back."""
    router = Router(STABLE_ARMED)
    made, registry = make(router), Registry(router, [REFUSED])
    monkeypatch.setattr(service, "rollback", registry.rollback)
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await asyncio.sleep(0.05)
    assert len(registry.calls) == 1
    router.current = dataclasses.replace(STABLE_ARMED, fallback_event_id=7)  # restored
    feed(made, 2, [Outcome.SAFETY_INCIDENT])
    await settled(made, registry)
    assert len(registry.calls) == 2
