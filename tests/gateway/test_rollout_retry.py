"""A verdict whose rollback call fails is retried, on SQLite and PostgreSQL (found by review): the
monitor empties the window at the verdict, and a failed call (a failover, a locked SQLite
database) used to be logged and forgotten, so a breaching canary kept its traffic until a whole
new window of bad requests filled. Now it stays pending and is retried with backoff until it
acts, or until the canary is no longer what the evidence judged."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.rollout_controller import RolloutController
from gateway.rollout_router import RolloutRouter
from registry import service
from registry.rollout import Thresholds
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
WINDOW = 20


class FlakySessions:
    """The controller's registry: `failures` sessions fail as a dropped connection does, then
    real ones (`failures` None: every one fails until the test sets a number)."""

    def __init__(self, real: async_sessionmaker[AsyncSession], failures: int | None):
        self._real = real
        self.failures = failures
        self.calls = 0
        self.called = asyncio.Event()

    def sessions(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        self.calls += 1
        self.called.set()
        if self.failures is None or self.calls <= self.failures:
            return self._dropped()
        return self._real()

    @contextlib.asynccontextmanager
    async def _dropped(self) -> AsyncIterator[AsyncSession]:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        yield  # pragma: no cover


def slow_request() -> Any:
    return types.SimpleNamespace(
        completed=True,
        failed=False,
        started=0.0,
        first_token_at=0.005,
        finished_at=0.5,  # SLA 100 ms
        streamed=True,
    )


async def canary(world: Any, sessions: Any) -> RolloutRouter:
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    async with sessions() as s:
        await service.start_rollout(s, name=NAME, version=2, actor="op")
    router = RolloutRouter(types.SimpleNamespace(sessions=sessions))  # type: ignore[arg-type]
    await router.refresh()
    view = router.view(NAME)
    assert view is not None and view.canary_version == 2
    return router


def controller(router: RolloutRouter, flaky: FlakySessions) -> RolloutController:
    return RolloutController(
        flaky,  # type: ignore[arg-type]
        router,
        Thresholds(sla_p95_e2e_ms=100, window=WINDOW),
        action_retry_s=0.001,
    )


async def settle(made: RolloutController) -> None:
    """Wait for the controller's actions, retries included (each may schedule the next)."""
    for _ in range(50):
        if not made._tasks:
            return
        await asyncio.gather(*list(made._tasks))
    raise AssertionError("the controller never stopped retrying")


async def test_a_failed_automatic_rollback_is_retried_until_it_acts(sessions, world):
    router = await canary(world, sessions)
    flaky = FlakySessions(sessions, failures=2)
    made = controller(router, flaky)
    for _ in range(WINDOW):
        made.observe(NAME, 2, slow_request())
    await settle(made)
    assert flaky.calls == 3  # two dropped connections, then the rollback
    async with sessions() as s:
        status = await service.rollout_status(s, name=NAME)
        events = await service.list_rollout_events(s, name=NAME)
    assert status.canary_version is None and status.rolled_back_version == 2
    rollback = next(e for e in events if e.action == "rollback")
    # the window's evidence reached the registry, though the first calls failed
    assert rollback.automatic and rollback.figures and rollback.figures["samples"] == WINDOW
    view = router.view(NAME)
    assert view is None or view.canary_version is None  # this replica routes to the stable
    await made.close()


async def test_a_pending_verdict_is_dropped_once_its_canary_is_gone(sessions, world):
    router = await canary(world, sessions)
    flaky = FlakySessions(sessions, failures=None)
    made = controller(router, flaky)
    for _ in range(WINDOW):
        made.observe(NAME, 2, slow_request())
    await flaky.called.wait()
    async with sessions() as s:  # an operator rolls it back meanwhile; this replica polls
        await service.rollback(s, name=NAME, actor="op", reason="by hand", automatic=False)
    await router.refresh()
    flaky.failures = 0  # the database is back: a retry would now act on the stale verdict
    await settle(made)
    async with sessions() as s:
        events = await service.list_rollout_events(s, name=NAME)
    assert [e.automatic for e in events if e.action == "rollback"] == [False]
    assert made._take_backs._pending == {} and made._take_backs._retry_at == {}
    await made.close()


async def test_an_error_that_is_no_outage_is_tried_a_few_times_then_given_up(sessions, world):
    """Retrying a bug (not a dropped connection) every 30 s with a traceback, forever, helps
    nobody: after MAX_ACTION_ATTEMPTS the verdict is dropped; outages retry until they end."""
    from gateway.rollout_takeback import MAX_ACTION_ATTEMPTS

    class Broken(FlakySessions):
        @contextlib.asynccontextmanager
        async def _dropped(self) -> AsyncIterator[AsyncSession]:
            raise ValueError("a bug in the rollback path")
            yield  # pragma: no cover

    router = await canary(world, sessions)
    broken = Broken(sessions, failures=None)
    made = controller(router, broken)
    for _ in range(WINDOW):
        made.observe(NAME, 2, slow_request())
    await settle(made)
    assert broken.calls == MAX_ACTION_ATTEMPTS + 1
    assert made._take_backs._pending == {} and made._take_backs._retry_at == {}
    await made.close()
