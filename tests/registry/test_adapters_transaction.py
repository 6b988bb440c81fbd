"""Registering a version stores its artifact with no transaction open, on SQLite and PostgreSQL
(found by review): the reads before the upload left their transaction open for the whole
upload (minutes for 2 GiB to S3), holding a pooled connection idle in transaction and, on
PostgreSQL, a snapshot; a few uploads at once took every connection of the pool."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from registry import service
from registry.errors import DuplicateAdapter
from registry.models import AdapterVersion
from registry.store.local import LocalArtifactStore
from tests.registry.rollout_world import World

NAME = "acme-support"


class PausedStore:
    """The world's store, whose put_dir stops after storing (a large upload still running)
    until `release` is set."""

    def __init__(self, inner: LocalArtifactStore):
        self._inner = inner
        self.uploading = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_dir(self, path: Path, *, files: Sequence[str] | None = None) -> str:
        digest = await self._inner.put_dir(path, files=files)
        self.uploading.set()
        await self.release.wait()
        return digest


def registering(
    session: AsyncSession, world: World, store: PausedStore, n: int, *, name: str, tenant: str
) -> asyncio.Task[AdapterVersion]:
    return asyncio.create_task(
        service.register_adapter_version(
            session,
            store=store,  # type: ignore[arg-type]
            artifact_dir=world.artifact(n),
            name=name,
            tenant=tenant,
            served_base=world.base_fp,
            max_lora_rank=16,
            actor="op",
        )
    )


async def backend_pid(session: AsyncSession) -> int | None:
    """The PostgreSQL backend serving the session's transaction (None on SQLite)."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return await session.scalar(text("SELECT pg_backend_pid()"))


async def backend_state(engine: AsyncEngine, pid: int | None) -> str | None:
    """pg_stat_activity's state of backend `pid`, read through another connection."""
    if pid is None:
        return None
    async with engine.connect() as connection:
        query = text("SELECT state FROM pg_stat_activity WHERE pid = :pid")
        return await connection.scalar(query, {"pid": pid})


async def test_no_transaction_is_open_while_the_artifact_is_stored(
    world: World, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    await world.register(NAME, 1)
    store = PausedStore(world.store)
    async with sessions() as session:
        # The registration's reads run in the transaction this read begins, on this backend.
        pid = await backend_pid(session)
        upload = registering(session, world, store, 2, name=NAME, tenant="acme")
        await store.uploading.wait()
        try:
            in_transaction = session.in_transaction()
            state = await backend_state(engine, pid)
        finally:
            store.release.set()
        registered = await upload
    assert not in_transaction
    assert state != "idle in transaction"
    assert registered.version == 2
    async with sessions() as s:
        adapter = await service.get_adapter(s, name=NAME)
    assert adapter.tenant.name == "acme" and adapter.stable_version == 1


async def test_a_name_taken_during_the_upload_is_refused_as_taken(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    """globex's first version of a name that acme registers meanwhile: the check under the
    lock reads globex's tenant row as read before the upload. Ending that transaction with a
    rollback expired it, and the check's lazy load failed (MissingGreenlet, a 500)."""
    store = PausedStore(world.store)
    async with sessions() as session:
        upload = registering(session, world, store, 2, name="contested", tenant="globex")
        await store.uploading.wait()
        try:
            async with sessions() as other:
                await world.register("contested", 1, session=other)
        finally:
            store.release.set()
        with pytest.raises(DuplicateAdapter):
            await upload
    async with sessions() as s:
        adapter = await service.get_adapter(s, name="contested")
    assert adapter.tenant.name == "acme"
