"""A replica's own write hands its view to the router after the commit; a poll may have loaded a
newer state in between (found by review). accept() took the older view anyway, and since the
stamps the poll holds were the newest, no later poll reloaded it: the replica routed on the old
state until the adapter's next write. On SQLite and PostgreSQL."""

from __future__ import annotations

import types
from typing import Any

from gateway.rollout_router import RolloutRouter
from registry import service
from tests.registry import conftest as registry_fixtures

# The registry's fixtures: each test runs on a migrated SQLite file and a PostgreSQL schema,
# with real adapters (tests/registry/conftest.py).
artifacts_root = registry_fixtures.artifacts_root
tiny_base = registry_fixtures.tiny_base
base_fp = registry_fixtures.base_fp
make_adapter = registry_fixtures.make_adapter
engine = registry_fixtures.engine
sessions = registry_fixtures.sessions
session = registry_fixtures.session
store = registry_fixtures.store
world = registry_fixtures.world

NAME = "acme-support"


async def router_for(sessions: Any) -> RolloutRouter:
    router = RolloutRouter(types.SimpleNamespace(sessions=sessions))  # type: ignore[arg-type]
    await router.refresh()
    return router


async def test_a_view_older_than_the_polled_one_is_ignored(sessions, world):
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    await world.evaluated(NAME, 3)
    async with sessions() as s:
        await service.start_rollout(s, name=NAME, version=2, actor="op")
    router = await router_for(sessions)
    # This replica's monitor rolls v2 back; its task accepts the view once the session closes.
    async with sessions() as s:
        change = await service.rollback(
            s,
            name=NAME,
            actor="rollout-monitor",
            reason="breach",
            automatic=True,
            version=2,
            role="canary",
        )
    # Meanwhile another replica starts the next canary, and this replica's poll sees it.
    async with sessions() as s:
        await service.start_rollout(s, name=NAME, version=3, actor="op")
    await router.refresh()
    router.accept(change.view)
    for _ in range(2):
        await router.refresh()
    view = router.view(NAME)
    assert view is not None and view.canary_version == 3
    assert router.route(NAME, "key:anyone") in (f"{NAME}@1", f"{NAME}@3")


async def test_an_older_view_does_not_bring_back_one_the_poll_dropped(sessions, world):
    """The poll's view is not kept (no canary, no shadow, no armed fallback): the older view
    with a canary must not come back as if it were news."""
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    router = await router_for(sessions)
    async with sessions() as s:  # an admin call on this replica: its view comes after commit
        started = await service.start_rollout(s, name=NAME, version=2, actor="op", percent=50)
    async with sessions() as s:  # another replica's monitor rolls it back at once
        await service.rollback(
            s,
            name=NAME,
            actor="rollout-monitor",
            reason="breach",
            automatic=True,
            version=2,
            role="canary",
        )
    await router.refresh()
    assert router.view(NAME) is None
    router.accept(started)
    await router.refresh()
    assert router.view(NAME) is None
    assert router.route(NAME, "key:anyone") is None  # `name` means its stable again


async def test_the_same_or_a_newer_view_is_taken(sessions, world):
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    async with sessions() as s:
        started = await service.start_rollout(s, name=NAME, version=2, actor="op")
    router = await router_for(sessions)
    router.accept(started)  # the poll already holds this very state
    view = router.view(NAME)
    assert view is not None and view.canary_percent == 1
    async with sessions() as s:
        promoted = await service.promote(s, name=NAME, actor="op")
    router.accept(promoted.view)  # before any poll
    view = router.view(NAME)
    assert view is not None and view.canary_percent == 10


async def test_a_view_read_before_any_rollout_write_is_older_than_every_stamped_one(
    sessions, world
):
    """A view without a stamp was read before the adapter's first rollout write (stamps are
    never cleared). It was taken unconditionally: a no-op call's view landing after the poll
    had loaded another replica's new canary dropped the canary from this replica until the
    adapter's next write."""
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    router = await router_for(sessions)
    async with sessions() as s:  # a verdict that finds nothing to do: its view, unstamped
        unchanged = await service.rollback(
            s,
            name=NAME,
            actor="rollout-monitor",
            reason="breach",
            automatic=True,
            version=2,
            role="canary",
        )
    assert not unchanged.acted and unchanged.view.updated_at is None
    async with sessions() as s:  # meanwhile another replica starts a canary
        await service.start_rollout(s, name=NAME, version=2, actor="op", percent=50)
    await router.refresh()
    router.accept(unchanged.view)
    for _ in range(2):
        await router.refresh()
    view = router.view(NAME)
    assert view is not None and view.canary_version == 2
