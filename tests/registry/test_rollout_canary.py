"""Canary rollouts through the service, on SQLite and on PostgreSQL, with real peft adapters:
the 1 → 10 → 50 → 100 % ladder, pause/resume, canary rollback with its figures, racing replicas,
polling for changes, and what each caller is served meanwhile."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import service
from registry.errors import (
    AdapterNotFound,
    InvalidInput,
    InvalidStateTransition,
    RegistryConflict,
    VersionNotFound,
)
from registry.rollout import assign
from registry.states import VersionState
from tests.registry.rollout_world import CALLERS, World

S = VersionState
FIGURES = {"samples": 100, "p95_ttft_ms": 140.5, "p95_e2e_ms": 900.0, "error_rate": 0.02}


@pytest.fixture
async def canary(world: World) -> World:
    """acme-support: v1 serving (never rolled out), v2 evaluated and in canary at 1 %."""
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    return world


def in_canary(percent: int) -> int:
    return sum(assign(c, "acme-support", percent) for c in CALLERS)


async def test_the_full_ladder(world: World):
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    # Before any rollout v1 serves: registering v2 pinned it as the stable.
    assert (await world.routes("acme-support")) == {"acme-support@1": len(CALLERS)}
    view = await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    assert (view.stable_version, view.canary_version, view.canary_percent) == (1, 2, 1)
    assert (view.stage, view.paused, view.active_target) == ("canary", False, None)
    generations = [await service.rollout_generation(world.session)]
    assert generations[0] == view.updated_at is not None
    assert await world.state("acme-support", 2) == S.CANARY_1

    for percent, state in ((10, S.CANARY_10), (50, S.CANARY_50)):
        change = await service.promote(world.session, name="acme-support", actor="ops")
        assert (change.acted, change.action, change.view.canary_percent) == (
            True,
            "promote",
            percent,
        )
        assert await world.state("acme-support", 2) == state
        routes = await world.routes("acme-support")
        assert routes["acme-support@2"] == in_canary(percent)
        assert routes["acme-support@1"] == len(CALLERS) - in_canary(percent)
        generations.append(await service.rollout_generation(world.session))
        # `name` alone is still the stable for admins and /v1/models.
        plain = await service.resolve_adapter(
            world.session, store=world.store, model="acme-support"
        )
        assert plain.version == 1

    change = await service.promote(world.session, name="acme-support", actor="ops")
    assert (change.acted, change.action) == (True, "complete")
    view = change.view
    assert (view.stable_version, view.canary_version, view.canary_percent) == (2, None, 0)
    assert view.stage == "complete"
    assert await world.state("acme-support", 2) == S.PRODUCTION
    assert await world.state("acme-support", 1) == S.COMPATIBLE  # kept, addressable as @1
    assert (await world.routes("acme-support")) == {"acme-support@2": len(CALLERS)}
    pinned = await service.resolve_adapter(world.session, store=world.store, model="acme-support@1")
    assert pinned.version == 1
    generations.append(await service.rollout_generation(world.session))
    stamps = [g for g in generations if g is not None]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4

    events = await world.events("acme-support")
    assert [(e.action, e.from_version, e.to_version, e.percent) for e in events] == [
        ("complete", 1, 2, 100),
        ("promote", 1, 2, 50),
        ("promote", 1, 2, 10),
        ("start", 1, 2, 1),
    ]
    assert {e.actor for e in events} == {"ops"}
    audit = await service.list_audit(world.session, target="adapter:acme-support", limit=4)
    assert [a.action for a in audit] == [
        "rollout.complete",
        "rollout.promote",
        "rollout.promote",
        "rollout.start",
    ]

    # A version registered after a rollout does not take traffic until it is rolled out.
    await world.evaluated("acme-support", 3)
    assert (await world.routes("acme-support")) == {"acme-support@2": len(CALLERS)}
    view = await service.start_rollout(
        world.session, name="acme-support", version=3, percent=10, actor="ops"
    )
    assert (view.stable_version, view.canary_version, view.canary_percent) == (2, 3, 10)
    assert await world.state("acme-support", 3) == S.CANARY_10


async def test_promote_to_a_given_stage_and_refusals(canary: World):
    session = canary.session
    change = await service.promote(session, name="acme-support", actor="ops", to_percent=50)
    assert change.view.canary_percent == 50
    assert await canary.state("acme-support", 2) == S.CANARY_50  # walked through canary_10
    for bad in (10, 50, 7):
        with pytest.raises(InvalidInput):
            await service.promote(session, name="acme-support", actor="ops", to_percent=bad)
    await service.promote(session, name="acme-support", actor="ops", to_percent=100)
    with pytest.raises(InvalidStateTransition, match="no canary"):
        await service.promote(session, name="acme-support", actor="ops")
    with pytest.raises(AdapterNotFound):
        await service.promote(session, name="no-such", actor="ops")


async def test_start_refusals(world: World):
    session = world.session
    await world.register("acme-support", 1)
    with pytest.raises(InvalidStateTransition, match="first version"):
        await service.start_rollout(session, name="acme-support", version=1, actor="ops")
    await world.register("acme-support", 2)
    with pytest.raises(InvalidStateTransition, match="compatible; it cannot become canary_1"):
        await service.start_rollout(session, name="acme-support", version=2, actor="ops")
    await service.mark_evaluated(session, name="acme-support", version=2, actor="evals")
    with pytest.raises(InvalidInput, match="not newer"):
        await service.start_rollout(session, name="acme-support", version=1, actor="ops")
    for percent in (0, 100, 7):
        with pytest.raises(InvalidInput):
            await service.start_rollout(
                session, name="acme-support", version=2, percent=percent, actor="ops"
            )
    with pytest.raises(VersionNotFound):
        await service.start_rollout(session, name="acme-support", version=9, actor="ops")
    with pytest.raises(AdapterNotFound):
        await service.start_rollout(session, name="no-such", version=2, actor="ops")
    assert await world.event_count() == 0  # nothing refused left a trace in the history

    await service.start_rollout(session, name="acme-support", version=2, actor="ops")
    await world.evaluated("acme-support", 3)
    with pytest.raises(RegistryConflict, match="already in canary"):
        await service.start_rollout(session, name="acme-support", version=3, actor="ops")


async def test_a_routed_version_cannot_be_retired(canary: World):
    session = canary.session
    for version in (1, 2):  # the canary, and the stable while the canary runs
        with pytest.raises(InvalidStateTransition):
            await service.retire_version(session, name="acme-support", version=version, actor="x")


async def test_pause_and_resume(canary: World):
    session = canary.session
    view = await service.pause_rollout(session, name="acme-support", actor="ops", reason="freeze")
    assert view.paused and view.canary_percent == 1
    again = await service.pause_rollout(session, name="acme-support", actor="ops")
    assert again.paused and again.updated_at == view.updated_at  # nothing written twice
    # Paused: the split stays, promotions stop (a replica's conditional call is a no-op).
    assert (await canary.routes("acme-support"))["acme-support@2"] == in_canary(1)
    with pytest.raises(InvalidStateTransition, match="paused"):
        await service.promote(session, name="acme-support", actor="ops")
    stale = await service.promote(
        session, name="acme-support", actor="gw", version=2, from_percent=1, automatic=True
    )
    assert not stale.acted and stale.view.canary_percent == 1

    view = await service.resume_rollout(session, name="acme-support", actor="ops")
    assert not view.paused
    change = await service.promote(
        session, name="acme-support", actor="gw", version=2, from_percent=1, automatic=True
    )
    assert change.acted and change.view.canary_percent == 10
    events = await canary.events("acme-support")
    assert [(e.action, e.automatic) for e in events[:3]] == [
        ("promote", True),
        ("resume", False),
        ("pause", False),
    ]
    assert events[2].reason == "freeze"

    await service.rollback(
        session, name="acme-support", actor="ops", reason="manual", automatic=False
    )
    with pytest.raises(InvalidStateTransition, match="no canary"):
        await service.pause_rollout(session, name="acme-support", actor="ops")


async def test_a_breaching_canary_rolls_back_with_its_figures(canary: World):
    session = canary.session
    await service.promote(session, name="acme-support", actor="ops")
    change = await service.rollback(
        session,
        name="acme-support",
        actor="gateway",
        reason="p95 TTFT 140.5 ms > SLA 85 ms + 15 ms margin",
        figures=FIGURES,
        automatic=True,
        version=2,
    )
    assert (change.acted, change.action) == (True, "rollback")
    view = change.view
    assert (view.stable_version, view.canary_version, view.canary_percent) == (1, None, 0)
    assert (view.stage, view.rolled_back_version) == ("rolled_back", 2)
    assert view.rolled_back_at is not None and view.active_target is None
    assert await canary.state("acme-support", 2) == S.ROLLED_BACK
    assert (await canary.routes("acme-support")) == {"acme-support@1": len(CALLERS)}
    with pytest.raises(AdapterNotFound):  # a rolled-back version answers no one, pinned or not
        await service.resolve_adapter(session, store=canary.store, model="acme-support@2")

    event = (await canary.events("acme-support"))[0]
    assert (event.action, event.from_version, event.to_version, event.percent) == (
        "rollback",
        2,
        1,
        10,
    )
    assert (event.figures, event.automatic, event.actor) == (FIGURES, True, "gateway")
    assert event.reason is not None and event.reason.startswith("p95 TTFT")
    audit = (await service.list_audit(session, action="rollout.rollback"))[0]
    assert audit.details["figures"] == FIGURES and audit.details["from_version"] == 2

    # Cool-down: the same version starts again only when forced.
    with pytest.raises(InvalidStateTransition, match="force=True"):
        await service.start_rollout(session, name="acme-support", version=2, actor="ops")
    view = await service.start_rollout(
        session, name="acme-support", version=2, actor="ops", force=True
    )
    assert view.canary_version == 2 and await canary.state("acme-support", 2) == S.CANARY_1
    assert view.rolled_back_version == 2  # the last rollback stays on record
    assert (await canary.events("acme-support"))[0].action == "start"
    restart = (await service.list_audit(session, action="rollout.start"))[0]
    assert restart.details["forced"] is True


async def test_a_second_rollback_of_the_same_canary_changes_nothing(canary: World):
    session = canary.session
    first = await service.rollback(
        session, name="acme-support", actor="gw-1", reason="error_rate", automatic=True, version=2
    )
    count = await canary.event_count()
    second = await service.rollback(
        session, name="acme-support", actor="gw-2", reason="error_rate", automatic=True, version=2
    )
    assert first.acted and not second.acted and second.action is None
    # Not mistaken for a breach of the stable: v1 keeps serving, nothing is recorded.
    assert second.view.active_target is None and second.view.stable_version == 1
    assert second.view.rolled_back_at == first.view.rolled_back_at
    assert await canary.event_count() == count
    # A replica that judged a canary at 1 % which has moved on: no promotion either.
    late = await service.promote(
        session, name="acme-support", actor="gw-2", version=2, from_percent=1, automatic=True
    )
    assert not late.acted


async def test_racing_replicas_roll_back_once(
    canary: World, sessions: async_sessionmaker[AsyncSession]
):
    async def replica(actor: str) -> bool:
        async with sessions() as session:
            await service.rollout_status(session, name="acme-support")  # its cached view
            change = await service.rollback(
                session,
                name="acme-support",
                actor=actor,
                reason="latency_p95",
                figures=FIGURES,
                automatic=True,
                version=2,
            )
            return change.acted

    outcomes = await asyncio.gather(*(replica(f"gw-{i}") for i in range(4)))
    assert sorted(outcomes) == [False, False, False, True]
    events = await canary.events("acme-support")
    assert [e.action for e in events] == ["rollback", "start"]
    assert await canary.state("acme-support", 2) == S.ROLLED_BACK


async def test_polling_returns_only_what_changed(world: World):
    session = world.session
    assert await service.rollout_generation(session) is None
    assert await service.list_rollouts(session) == []
    for name in ("acme-a", "acme-b", "acme-c"):
        await world.register(name, 1)
        await world.evaluated(name, 2)
    await service.start_rollout(session, name="acme-a", version=2, actor="ops")
    await service.start_rollout(session, name="acme-b", version=2, actor="ops")
    seen = await service.rollout_generation(session)
    assert seen is not None
    assert [v.name for v in await service.list_rollouts(session)] == ["acme-a", "acme-b"]

    await service.promote(session, name="acme-b", actor="ops")
    await service.set_thresholds(session, name="acme-c", thresholds={"window": 50}, actor="ops")
    changed = await service.list_rollouts(session, since=seen)
    # `since` is inclusive: the write stamped exactly `seen` (acme-b's start) comes back too.
    assert [(v.name, v.canary_percent) for v in changed] == [("acme-b", 10), ("acme-c", 0)]
    newest = await service.rollout_generation(session)
    assert newest is not None and newest > seen
    assert [v.name for v in await service.list_rollouts(session, since=newest)] == ["acme-c"]
    assert len(await service.list_rollouts(session)) == 3


async def test_after_a_rollout_the_retired_stable_can_be_deleted(canary: World):
    """README's retire-then-delete after a completed rollout: the stable pointer still named
    the retired version, and delete refused it as "the adapter's stable"."""
    world = canary
    for _ in range(3):
        await service.promote(world.session, name="acme-support", actor="ops")  # 10, 50, 100 %
    await service.retire_version(world.session, name="acme-support", version=2, actor="ops")
    assert (await world.routes("acme-support")) == {"acme-support@1": len(CALLERS)}
    deleted = await service.delete_version(
        world.session, store=world.store, name="acme-support", version=2, actor="ops"
    )
    assert deleted.state == S.DELETED
    assert (await world.routes("acme-support")) == {"acme-support@1": len(CALLERS)}
    view = await service.rollout_status(world.session, name="acme-support")
    assert view.stable_version == 1  # what serves now; no pointer at the deleted version


async def test_the_serving_stable_cannot_be_deleted(canary: World):
    world = canary
    for _ in range(3):
        await service.promote(world.session, name="acme-support", actor="ops")
    with pytest.raises(InvalidStateTransition):
        await service.delete_version(
            world.session, store=world.store, name="acme-support", version=2, actor="ops"
        )
