"""Registering a version copies or uploads its artifact before taking the adapter's lock, on
SQLite and PostgreSQL (found by review): the lock was held for the whole upload, so a canary's
automatic rollback of that adapter waited for it on PostgreSQL, and on SQLite (where the lock
is the database's write lock) every other write failed "database is locked" after
busy_timeout. Each test holds the registration inside put_dir until the other write is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import service
from registry.compat.problems import ProblemCode
from registry.errors import AdapterRejected
from registry.models import AdapterVersion
from registry.store.local import LocalArtifactStore
from tests.registry.rollout_world import World

T = TypeVar("T")
NAME = "acme-support"
# Only a bound on a wait that must not happen: the other write is done in milliseconds when
# nothing holds the lock, and waited for the whole upload (or busy_timeout, 5 s) before the fix.
NO_WAIT_S = 4.0


class PausedStore:
    """The world's store, whose put_dir stops after storing (a large upload still running)
    until `release` is set."""

    def __init__(self, inner: LocalArtifactStore):
        self._inner = inner
        self.uploading = asyncio.Event()
        self.release = asyncio.Event()
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_dir(self, path: Path, *, files: Sequence[str] | None = None) -> str:
        self.puts += 1
        digest = await self._inner.put_dir(path, files=files)
        self.uploading.set()
        await self.release.wait()
        return digest


def registering(
    sessions: async_sessionmaker[AsyncSession], world: World, store: PausedStore, n: int, **kw: Any
) -> asyncio.Task[AdapterVersion]:
    async def register() -> AdapterVersion:
        async with sessions() as session:
            return await service.register_adapter_version(
                session,
                store=store,  # type: ignore[arg-type]
                artifact_dir=world.artifact(n),
                name=kw.pop("name", NAME),
                tenant=kw.pop("tenant", "acme"),
                served_base=world.base_fp,
                max_lora_rank=16,
                actor="op",
                **kw,
            )

    return asyncio.create_task(register())


async def during_upload(store: PausedStore, write: Awaitable[T]) -> T:
    """`write` run while the registration is inside put_dir: it must not wait for it."""
    await store.uploading.wait()
    try:
        return await asyncio.wait_for(write, NO_WAIT_S)
    except TimeoutError:
        pytest.fail(f"a write waited {NO_WAIT_S} s for an upload it has nothing to do with")
    finally:
        store.release.set()


async def test_a_canary_rollback_does_not_wait_for_an_upload_of_the_adapter(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    async with sessions() as s:
        await service.start_rollout(s, name=NAME, version=2, actor="op")
    store = PausedStore(world.store)
    upload = registering(sessions, world, store, 3)

    async def roll_back() -> bool:
        async with sessions() as s:
            change = await service.rollback(
                s,
                name=NAME,
                actor="rollout-monitor",
                reason="p95 breach",
                automatic=True,
                version=2,
                role="canary",
            )
        return change.acted

    assert await during_upload(store, roll_back())
    registered = await upload
    assert registered.version == 3
    async with sessions() as s:
        status = await service.rollout_status(s, name=NAME)
    assert (status.canary_version, status.rolled_back_version, status.stable_version) == (
        None,
        2,
        1,
    )
    assert store.puts == 1


async def test_other_writes_do_not_wait_for_an_upload(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    """On SQLite the adapter's lock was the database's write lock: a new tenant failed."""
    await world.register(NAME, 1)
    store = PausedStore(world.store)
    upload = registering(sessions, world, store, 2)

    async def create_tenant() -> str:
        async with sessions() as s:
            tenant = await service.create_tenant(s, name="newco", actor="op")
        return tenant.name

    assert await during_upload(store, create_tenant()) == "newco"
    assert (await upload).version == 2


async def test_files_deleted_during_the_upload_are_stored_again(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    """The delete of the last version using the same files no longer waits for the upload; it
    removes the object put_dir had just found stored. The registration, under the artifact's
    lock, stores it again before its row references it."""
    await world.register("bot", 2)  # bot@1, the stable
    await world.register("bot", 1)  # bot@2, whose files (artifact 1) "other" registers
    async with sessions() as s:
        digest = (await service.get_version(s, name="bot", version=2)).artifact_sha256
    store = PausedStore(world.store)
    upload = registering(sessions, world, store, 1, name="other", tenant="globex")

    async def delete() -> bool:
        async with sessions() as s:
            await service.delete_version(s, store=world.store, name="bot", version=2, actor="op")
        return await world.store.exists(digest)

    assert await during_upload(store, delete()) is False
    other = await upload
    assert other.artifact_sha256 == digest and store.puts == 2
    assert await world.store.exists(digest)
    async with sessions() as s:
        resolved = await service.resolve_adapter(
            s, store=world.store, model="other", tenant="globex"
        )
    assert resolved.path is not None and resolved.path.exists()


async def test_a_version_registered_during_the_upload_is_decided_again_under_the_lock(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    """The checks run before the upload are repeated under the lock: the same files registered
    meanwhile make this upload a duplicate, refused with its audit row."""
    await world.register(NAME, 1)
    store = PausedStore(world.store)
    upload = registering(sessions, world, store, 2)

    async def register_same_files() -> int:
        async with sessions() as s:
            return await world.register(NAME, 2, session=s)

    assert await during_upload(store, register_same_files()) == 2
    with pytest.raises(AdapterRejected) as refused:
        await upload
    assert [p.code for p in refused.value.problems] == [ProblemCode.DUPLICATE_ARTIFACT]
    async with sessions() as s:
        versions = await service.list_versions(s, name=NAME)
    assert [v.version for v in versions] == [1, 2]
