"""Shadow mode through the service, on SQLite and on PostgreSQL, with real peft adapters: start
(pins the stable, evaluated → shadow), change of share, stop (→ evaluated), every refusal,
the canary start that ends a shadow, retire/delete refusals, events, audit rows and the stamp
replicas poll."""

from __future__ import annotations

import pytest

from registry import service
from registry.errors import (
    AdapterNotFound,
    InvalidInput,
    InvalidStateTransition,
    RegistryConflict,
    VersionNotFound,
)
from registry.states import VersionState
from tests.registry.rollout_world import CALLERS, World

S = VersionState
NAME = "acme-support"


@pytest.fixture
async def world(world: World) -> World:
    """conftest's world with NAME's v1 registered and v2 evaluated."""
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    return world


async def test_start_pins_the_stable_and_routing_stays_on_it(world: World):
    # Before: v1 serves `name` (registering v2 pinned it).
    assert (await world.routes(NAME)) == {f"{NAME}@1": len(CALLERS)}
    view = await service.start_shadow(
        world.session, name=NAME, version=2, percent=25, actor="ops", reason="eval passed"
    )
    assert (view.stable_version, view.shadow_version, view.shadow_percent) == (1, 2, 25)
    assert view.shadow_running and view.watched and not view.steers
    assert view.canary_version is None and view.shadow_version_id is not None
    assert await world.state(NAME, 2) == S.SHADOW
    # Nobody is served the shadow; it stays addressable for the mirror (name@2).
    assert (await world.routes(NAME)) == {f"{NAME}@1": len(CALLERS)}
    pinned = await service.resolve_adapter(world.session, store=world.store, model=f"{NAME}@2")
    assert pinned.state == S.SHADOW
    assert [v.name for v in await service.list_rollouts(world.session)] == [NAME]
    assert await service.rollout_generation(world.session) == view.updated_at

    [event] = await world.events(NAME)
    assert (event.action, event.from_version, event.to_version, event.percent) == (
        "shadow_start",
        1,
        2,
        25,
    )
    assert event.reason == "eval passed" and event.actor == "ops"
    audit = await service.list_audit(world.session, limit=1)
    assert audit[0].action == "rollout.shadow_start" and audit[0].target == f"adapter:{NAME}"


async def test_change_share_then_stop_returns_it_to_evaluated(world: World):
    first = await service.start_shadow(world.session, name=NAME, version=2, percent=10, actor="a")
    same = await service.start_shadow(world.session, name=NAME, version=2, percent=10, actor="a")
    assert same.updated_at == first.updated_at  # nothing to change: nothing written
    wider = await service.start_shadow(world.session, name=NAME, version=2, percent=100, actor="a")
    assert wider.shadow_percent == 100 and wider.updated_at > first.updated_at

    stopped = await service.stop_shadow(world.session, name=NAME, actor="ops", reason="diverges")
    assert (stopped.shadow_version, stopped.shadow_percent, stopped.shadow_running) == (
        None,
        0,
        False,
    )
    assert stopped.updated_at > wider.updated_at
    assert stopped.stable_version == 1  # still pinned: stopping changes no routing
    assert await world.state(NAME, 2) == S.EVALUATED
    actions = [(e.action, e.percent) for e in await world.events(NAME)]
    assert actions == [("shadow_stop", 100), ("shadow_update", 100), ("shadow_start", 10)]
    updated = next(e for e in await world.events(NAME) if e.action == "shadow_update")
    audit = await service.list_audit(world.session, limit=5)
    assert updated.to_version == 2
    assert "rollout.shadow_update" in [a.action for a in audit]
    with pytest.raises(InvalidStateTransition, match="no shadow running"):
        await service.stop_shadow(world.session, name=NAME, actor="ops")
    # Stopped, it can shadow again or go straight to a canary.
    again = await service.start_shadow(world.session, name=NAME, version=2, percent=5, actor="a")
    assert again.shadow_version == 2


@pytest.mark.parametrize("percent", [0, 101, -1])
async def test_share_must_be_1_to_100(world: World, percent: int):
    before = await world.event_count()
    with pytest.raises(InvalidInput, match="1 to 100"):
        await service.start_shadow(
            world.session, name=NAME, version=2, percent=percent, actor="ops"
        )
    assert await world.event_count() == before


async def test_start_refusals(world: World):
    session = world.session
    with pytest.raises(AdapterNotFound):
        await service.start_shadow(session, name="nobody", version=2, percent=5, actor="ops")
    with pytest.raises(VersionNotFound):
        await service.start_shadow(session, name=NAME, version=9, percent=5, actor="ops")
    with pytest.raises(InvalidStateTransition, match="is compatible"):
        # v1 is only compatible (never evaluated), and it is the stable anyway.
        await service.start_shadow(session, name=NAME, version=1, percent=5, actor="ops")
    await service.start_shadow(session, name=NAME, version=2, percent=5, actor="ops")
    await world.evaluated(NAME, 3)  # registered after: the pinned stable stays v1
    with pytest.raises(RegistryConflict, match="already in shadow"):
        await service.start_shadow(session, name=NAME, version=3, percent=5, actor="ops")
    await service.stop_shadow(session, name=NAME, actor="ops")

    # The running canary is not a shadow candidate.
    await service.start_rollout(session, name=NAME, version=3, actor="ops")
    with pytest.raises(RegistryConflict, match="running canary"):
        await service.start_shadow(session, name=NAME, version=3, percent=5, actor="ops")
    await service.promote(session, name=NAME, actor="ops", to_percent=100)  # v3 is the stable
    with pytest.raises(InvalidInput, match="not newer than the stable"):
        await service.start_shadow(session, name=NAME, version=2, percent=5, actor="ops")

    # A first version has no stable whose traffic it could mirror.
    await world.evaluated("acme-new", 4)
    with pytest.raises(InvalidStateTransition, match="no servable version below"):
        await service.start_shadow(session, name="acme-new", version=1, percent=5, actor="ops")


async def test_a_canary_of_the_shadow_version_ends_the_shadow(world: World):
    await service.start_shadow(world.session, name=NAME, version=2, percent=50, actor="ops")
    view = await service.start_rollout(world.session, name=NAME, version=2, actor="ops")
    assert (view.canary_version, view.canary_percent, view.shadow_version) == (2, 1, None)
    assert await world.state(NAME, 2) == S.CANARY_1  # shadow → canary_1, not via evaluated
    actions = [e.action for e in await world.events(NAME)]
    assert actions == ["start", "shadow_stop", "shadow_start"]


async def test_a_shadow_beside_a_canary_ends_when_the_stable_overtakes_it(world: World):
    await service.start_shadow(world.session, name=NAME, version=2, percent=10, actor="ops")
    await world.evaluated(NAME, 3)
    await service.start_rollout(world.session, name=NAME, version=3, actor="ops")
    running = await service.rollout_status(world.session, name=NAME)
    assert (running.canary_version, running.shadow_version) == (3, 2)
    change = await service.promote(world.session, name=NAME, actor="ops", to_percent=100)
    assert (change.view.stable_version, change.view.shadow_version) == (3, None)
    assert await world.state(NAME, 2) == S.EVALUATED
    complete = next(e for e in await world.events(NAME) if e.action == "complete")
    audit = await service.list_audit(world.session, limit=1)
    assert audit[0].details["ended_shadow"] == 2 and complete.to_version == 3


async def test_the_shadow_and_its_stable_cannot_be_retired_or_deleted(world: World):
    await service.start_shadow(world.session, name=NAME, version=2, percent=10, actor="ops")
    for version, why in ((2, "is in shadow"), (1, "compared with")):
        with pytest.raises(InvalidStateTransition, match=why):
            await service.retire_version(world.session, name=NAME, version=version, actor="ops")
        with pytest.raises(InvalidStateTransition):
            await service.delete_version(
                world.session, store=world.store, name=NAME, version=version, actor="ops"
            )
    assert await world.state(NAME, 2) == S.SHADOW
    await service.stop_shadow(world.session, name=NAME, actor="ops")
    retired = await service.retire_version(world.session, name=NAME, version=2, actor="ops")
    assert retired.state == S.RETIRED
