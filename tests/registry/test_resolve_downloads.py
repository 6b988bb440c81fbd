"""Resolving with local files never downloads inside the caller's database transaction: a remote
store's download takes seconds, and a pooled connection held idle in transaction meanwhile is
one fewer for every other request (a burst of first requests for pinned or canary versions ran
the pool dry). A transaction the resolution began itself is ended first; the caller's own is
left to the caller. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from registry import service
from registry.models import Tenant
from tests.registry.rollout_world import World


class Watched:
    """The world's store, noting whether the session was in a transaction at each download."""

    def __init__(self, store: Any, session: AsyncSession):
        self._store, self._session = store, session
        self.in_transaction: list[bool] = []

    async def get_path(self, digest: str) -> Path:
        self.in_transaction.append(self._session.in_transaction())
        return await self._store.get_path(digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_pinned_current_and_canary_versions_download_outside_the_transaction(world: World):
    session = world.session
    await world.register("rd-pinned", 1)
    await world.register("rd-canary", 2)
    await world.evaluated("rd-canary", 3)
    await service.start_rollout(session, name="rd-canary", version=2, actor="a")
    await session.commit()
    store = Watched(world.store, session)

    for model in ("rd-pinned@1", "rd-pinned", "rd-canary@2"):
        resolved = await service.resolve_adapter(session, store=store, model=model, tenant="acme")
        assert resolved.path is not None and (resolved.path / "adapter_config.json").exists()
    for caller in (f"caller-{i}" for i in range(20)):  # both sides of the canary
        routed = await service.resolve_rollout_version(
            session, store=store, model="rd-canary", caller_key=caller, tenant="acme"
        )
        assert routed is not None and routed.path is not None
    listed = await service.list_resolvable(session, store=store, tenant="acme", with_paths=True)
    assert {r.name for r in listed} == {"rd-pinned", "rd-canary"}
    assert store.in_transaction and not any(store.in_transaction)


async def test_without_paths_nothing_is_downloaded(world: World):
    await world.register("rd-plain", 4)
    store = Watched(world.store, world.session)
    resolved = await service.resolve_adapter(
        world.session, store=store, model="rd-plain@1", tenant="acme", with_path=False
    )
    assert resolved.path is None and store.in_transaction == []
    assert resolved.artifact_sha256 and (await world.store.get_path(resolved.artifact_sha256))


async def test_the_callers_own_transaction_is_left_open(world: World):
    session = world.session
    await world.register("rd-own", 5)
    await session.commit()
    store = Watched(world.store, session)
    await session.execute(select(Tenant.id))  # the caller began a transaction
    await service.resolve_adapter(session, store=store, model="rd-own@1", tenant="acme")
    assert store.in_transaction == [True] and session.in_transaction()
    await session.rollback()
