"""The controller judges a version on evidence about it in its current role (found by review):
mirrored shadow copies never share a window with served traffic (one 20 ms canary request
after 100 slow shadow copies rolled the canary back; a late mirror's error did too); a
restarted canary, and a stable restored after a fallback, start a new window; a client that
hung up after the SLA counts as a slow request; a verdict names the role it judged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import types
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.rollback_monitor import Sample, Verdict, WindowFigures
from gateway.rollout_controller import RolloutController
from registry import service
from registry.rollout import RolloutChange, RolloutView, Thresholds

SHADOW = RolloutView(
    name="bot",
    tenant="acme",
    base_model="b",
    base_sha256="x",
    stable_version=2,
    stable_version_id=2,
    canary_version=None,
    canary_version_id=None,
    canary_percent=0,
    shadow_version=3,
    shadow_version_id=3,
    shadow_percent=10,
    paused=False,
    stage=None,
    rollback_target="base",
    active_target=None,
    auto_fallback=False,
    rolled_back_version=None,
    rolled_back_at=None,
    updated_at=None,
    stable_card=None,
    canary_card=None,
    shadow_card=None,
    threshold_override=None,
)
CANARY = dataclasses.replace(
    SHADOW,
    canary_version=3,
    canary_version_id=3,
    canary_percent=1,
    shadow_version=None,
    shadow_version_id=None,
    shadow_percent=0,
    stage="canary",
)


class Router:
    def __init__(self, view: RolloutView):
        self.current = view

    def view(self, name: str) -> RolloutView:
        return self.current

    def accept(self, view: RolloutView) -> None:
        self.current = view


def controller(router: Router, *, auto_promote: bool) -> tuple[RolloutController, list[str]]:
    made = RolloutController(
        None,  # type: ignore[arg-type]  # the registry is only reached by spawned actions
        router,  # type: ignore[arg-type]
        Thresholds(sla_p95_e2e_ms=100, window=20),
        auto_promote=auto_promote,
    )
    spawned: list[str] = []

    def spawn(coroutine: Any) -> None:
        spawned.append(coroutine.cr_code.co_name)
        coroutine.close()

    made._spawn = spawn  # type: ignore[method-assign]
    return made, spawned


def request(e2e_s: float) -> Any:
    return types.SimpleNamespace(
        completed=True,
        failed=False,
        started=0.0,
        first_token_at=0.005,
        finished_at=e2e_s,
        streamed=True,
    )


def hang_up(after_s: float, streamed: bool = True) -> Any:
    """A client that gave up after `after_s`, before its first token."""
    return types.SimpleNamespace(
        completed=False,
        failed=False,
        started=0.0,
        first_token_at=None,
        finished_at=after_s,
        streamed=streamed,
    )


@pytest.mark.parametrize(("shadow_ms", "auto_promote"), [(500, False), (10, True)])
def test_shadow_copies_do_not_judge_the_canary_of_the_same_version(shadow_ms, auto_promote):
    router = Router(SHADOW)
    made, spawned = controller(router, auto_promote=auto_promote)
    for _ in range(100):
        made.record_shadow("bot", 3, Sample(0.005, shadow_ms / 1000, False))
    router.current = CANARY
    made.observe("bot", 3, request(0.020))
    assert spawned == []
    figures = made.figures("bot", 3)
    assert figures is not None and figures.samples == 1  # its own request only
    for _ in range(19):
        made.observe("bot", 3, request(0.020))
    assert spawned == (["_promote"] if auto_promote else [])  # a full window of its own


def test_a_restarted_canary_of_the_same_version_starts_a_new_window():
    router = Router(CANARY)
    made, spawned = controller(router, auto_promote=False)
    for _ in range(19):
        made.observe("bot", 3, request(0.5))  # slow, one short of a verdict
    # rolled back by another replica, then started again
    router.current = dataclasses.replace(
        CANARY, rolled_back_version=3, rolled_back_at=datetime(2026, 12, 6, tzinfo=UTC)
    )
    made.observe("bot", 3, request(0.5))
    assert spawned == []
    assert made.figures("bot", 3).samples == 1  # type: ignore[union-attr]


def test_only_server_side_errors_count_against_the_version():
    """A request the engine refused as invalid (400) is the client's doing; it used to be
    recorded as a failure of the version, and could roll a canary back (review)."""
    from gateway.errors import EngineUnavailable, InvalidRequest, ModelNotFound
    from gateway.services.generation_outcome import GenerationFailed, the_versions_fault

    assert not the_versions_fault(InvalidRequest("bad stop sequence"))
    assert not the_versions_fault(ModelNotFound("x"))
    assert the_versions_fault(GenerationFailed("engine failed"))
    assert the_versions_fault(EngineUnavailable("down"))
    assert the_versions_fault(RuntimeError("corrupt weights"))
    from gateway.adapter_loads import AdapterCapacityFull

    assert not the_versions_fault(AdapterCapacityFull("every slot in use"))  # the engine's


def test_a_mirror_that_ends_after_the_canary_started_never_reaches_its_window():
    """A mirror sent while v3 was the shadow fails after v3's first canary request: it landed
    in the canary's window, and one error in it was a verdict (review)."""
    router = Router(SHADOW)
    made, spawned = controller(router, auto_promote=False)
    router.current = CANARY
    made.observe("bot", 3, request(0.020))
    made.record_shadow("bot", 3, Sample(None, 0.3, True))  # the late mirror
    for _ in range(19):
        made.observe("bot", 3, request(0.020))
    assert spawned == []
    assert made.figures("bot", 3) == WindowFigures(20, 5.0, 20.0, 0.0)
    mirrored = made.figures("bot", 3, shadow=True)
    assert mirrored is not None and (mirrored.samples, mirrored.error_rate) == (1, 1.0)
    assert made.failing_addresses() == set()  # a shadow's window is no fallback target


STABLE_ARMED = dataclasses.replace(
    SHADOW, shadow_version=None, shadow_version_id=None, shadow_percent=0, auto_fallback=True
)
FELL_BACK = dataclasses.replace(STABLE_ARMED, active_target="base", fallback_event_id=7)
RESTORED = dataclasses.replace(STABLE_ARMED, fallback_event_id=8)


@pytest.mark.parametrize("saw_the_fallback", [True, False])
def test_a_restored_stable_is_judged_only_on_requests_after_the_restore(saw_the_fallback):
    """Replica B holds 12 slow requests of the armed stable bot@2 (window 20) when replica A
    moves bot to the base; an operator restores it. B's 12 old samples, plus one in-flight
    request that ended during the fallback, made a verdict after 7 healthy requests, and bot
    fell back again (review). B may also have missed the fallback and restore in between
    polls: the restore's event still tells the windows apart."""
    router = Router(STABLE_ARMED)
    made, spawned = controller(router, auto_promote=False)
    for _ in range(12):
        made.observe("bot", 2, request(0.5))
    if saw_the_fallback:
        router.current = FELL_BACK
        made.observe("bot", 2, request(0.5))  # started before the fallback: not recorded
        assert made.figures("bot", 2) is None
    router.current = RESTORED
    for _ in range(19):
        made.observe("bot", 2, request(0.02))
    assert spawned == []
    assert made.figures("bot", 2).samples == 19  # type: ignore[union-attr]
    made.observe("bot", 2, request(0.02))
    assert spawned == []  # a full, healthy window after the restore
    for _ in range(20):
        made.observe("bot", 2, request(0.5))
    assert spawned == ["take_back"]  # new evidence still judges it


def test_a_canary_every_client_gives_up_on_is_rolled_back():
    """Clients hang up on a canary that answers after the SLA: those requests were never
    recorded, its window never filled and it was never rolled back (review)."""
    router = Router(CANARY)
    made, spawned = controller(router, auto_promote=False)
    for _ in range(19):
        made.observe("bot", 3, hang_up(0.3))  # SLA 100 ms + 15 ms margin: gone after 300 ms
    assert spawned == [] and made.figures("bot", 3).samples == 19  # type: ignore[union-attr]
    made.observe("bot", 3, hang_up(0.3))
    assert spawned == ["take_back"]


def test_a_hang_up_before_any_bound_counts_as_nothing():
    router = Router(CANARY)
    made, spawned = controller(router, auto_promote=False)
    for _ in range(40):
        made.observe("bot", 3, hang_up(0.05))
    assert made.figures("bot", 3) is None and spawned == []


class Runtime:
    @contextlib.asynccontextmanager
    async def sessions(self) -> AsyncIterator[None]:
        yield None


@pytest.mark.parametrize(
    ("view", "version", "stable"), [(CANARY, 3, False), (STABLE_ARMED, 2, True)]
)
def test_a_verdict_names_the_role_it_judged(monkeypatch, view, version, stable):
    """rollback(version=N) could not tell a canary verdict from a stable one: a stale canary
    verdict moved the stable N had become to the base (review)."""
    calls: list[dict[str, Any]] = []

    async def rollback(session: Any, **kwargs: Any) -> RolloutChange:
        calls.append(kwargs)
        return RolloutChange(view, acted=False)

    monkeypatch.setattr(service, "rollback", rollback)
    router = Router(view)
    made = RolloutController(
        Runtime(),  # type: ignore[arg-type]
        router,  # type: ignore[arg-type]
        Thresholds(sla_p95_e2e_ms=100, window=20),
    )
    verdict = Verdict("latency_p95", WindowFigures(20, 5.0, 500.0, 0.0), "slow")
    asyncio.run(made._take_backs.take_back(view, version, verdict, stable=stable))
    assert [(c["version"], c["role"]) for c in calls] == [
        (version, "stable" if stable else "canary")
    ]
