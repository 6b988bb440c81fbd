"""Admin writes racing each other as several replicas would send them, on SQLite and on
PostgreSQL. Each race holds one side's transaction open (a slow commit) while the other runs:
with the adapter's lock taken first by every writer, and the artifact's lock by registration
and deletion, the second side waits and then decides on what the first committed. Found by
review; each case failed before the locks. A registration paused inside put_dir holds no lock
(the upload runs before them), so a delete then goes first and the registration re-stores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import service
from registry.errors import AdapterRejected, RegistryError
from tests.registry.rollout_world import World

HOLD_S = 0.5


def slow_commit(session: AsyncSession) -> None:
    """The session's next commits of a transaction that wrote wait HOLD_S first: its locks are
    held that long. A read-only one (a registration's, ended before its upload) holds none, and
    slowing it only let the other side take the locks first."""
    commit = session.commit
    flushed = False

    @event.listens_for(session.sync_session, "after_flush")
    def wrote(*_: Any) -> None:
        nonlocal flushed
        flushed = True

    async def held() -> None:
        nonlocal flushed
        if flushed or session.new or session.dirty or session.deleted:
            await asyncio.sleep(HOLD_S)
        flushed = False
        await commit()

    session.commit = held  # type: ignore[method-assign]


async def outcome(call: Awaitable[Any]) -> str:
    try:
        await call
        return "ok"
    except RegistryError as exc:
        return type(exc).__name__


async def race(
    sessions: async_sessionmaker[AsyncSession],
    first: Callable[[AsyncSession], Awaitable[Any]],
    second: Callable[[AsyncSession], Awaitable[Any]],
) -> list[str]:
    """`first` starts and holds its transaction; `second` starts while it does."""
    async with sessions() as a, sessions() as b:
        slow_commit(a)
        one = asyncio.create_task(outcome(first(a)))
        await asyncio.sleep(HOLD_S / 5)
        two = asyncio.create_task(outcome(second(b)))
        return list(await asyncio.gather(one, two))


@pytest.mark.parametrize(
    ("starting", "retired"),
    [
        ("canary", 1),  # the stable a canary starts against
        ("shadow", 2),  # the version a shadow starts on
    ],
)
async def test_retiring_waits_for_a_rollout_starting_on_that_version(
    world: World, sessions: async_sessionmaker[AsyncSession], starting: str, retired: int
):
    await world.register("bot", 1)
    await world.evaluated("bot", 2)

    async def start(session: AsyncSession) -> Any:
        if starting == "canary":
            return await service.start_rollout(session, name="bot", version=2, actor="ops")
        return await service.start_shadow(session, name="bot", version=2, percent=10, actor="ops")

    results = await race(
        sessions,
        start,
        lambda s: service.retire_version(s, name="bot", version=retired, actor="ops"),
    )
    assert results == ["ok", "InvalidStateTransition"]
    assert await world.state("bot", retired) != "retired"


async def test_a_fallback_target_cannot_be_retired_while_the_fallback_commits(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    await world.register("bot", 1)
    await world.register("guard", 2)
    await service.set_rollback_path(world.session, name="bot", target="guard@1", actor="ops")
    results = await race(
        sessions,
        lambda s: service.rollback(s, name="bot", actor="ops", reason="manual", automatic=False),
        lambda s: service.retire_version(s, name="guard", version=1, actor="ops"),
    )
    assert results == ["ok", "InvalidStateTransition"]
    async with sessions() as check:
        resolved = await service.resolve_adapter(check, store=world.store, model="guard@1")
    assert resolved.version == 1


async def test_the_same_files_registered_twice_at_once_become_one_version(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    await world.register("bot", 1)

    async def register(session: AsyncSession) -> Any:
        return await world.register("bot", 2, session=session)

    results = await race(sessions, register, register)
    assert results == ["ok", AdapterRejected.__name__]  # duplicate_artifact
    assert [v.version for v in await service.list_versions(world.session, name="bot")] == [1, 2]


async def test_deleting_the_last_user_of_files_during_their_registration_elsewhere(
    world: World, sessions: async_sessionmaker[AsyncSession], monkeypatch
):
    """`other` registers bot@2's files while bot@2 is deleted: put_dir found the object
    stored, and `other@1` must not commit without it. Storing runs before the registration's
    locks (test_adapters_upload_lock), so the delete does not wait for it and removes the
    object; the registration stores it again under the artifact's lock. (bot@1 is the stable,
    which cannot be deleted.)"""
    await world.register("bot", 2)
    await world.register("bot", 1)
    stored, release = asyncio.Event(), asyncio.Event()
    put_dir = world.store.put_dir

    async def paused_put_dir(*args: Any, **kwargs: Any) -> str:
        digest = await put_dir(*args, **kwargs)
        stored.set()
        await release.wait()
        return digest

    monkeypatch.setattr(world.store, "put_dir", paused_put_dir)
    async with sessions() as a, sessions() as b:
        registering = asyncio.create_task(
            service.register_adapter_version(
                a,
                store=world.store,
                artifact_dir=world.artifact(1),
                name="other",
                tenant="globex",
                served_base=world.base_fp,
                max_lora_rank=16,
                actor="ops",
            )
        )
        await stored.wait()
        deleting = service.delete_version(b, store=world.store, name="bot", version=2, actor="ops")
        await asyncio.wait_for(deleting, 20 * HOLD_S)  # no lock is held during the upload
        release.set()
        other = await registering
    assert await world.store.exists(other.artifact_sha256)
    async with sessions() as check:
        resolved = await service.resolve_adapter(
            check, store=world.store, model="other", tenant="globex"
        )
    assert resolved.path is not None and resolved.path.exists()


async def test_concurrent_limit_changes_both_apply(
    world: World, sessions: async_sessionmaker[AsyncSession]
):
    results = await race(
        sessions,
        lambda s: service.change_tenant_policy(
            s, tenant="acme", changes={"requests_per_second": 5}, actor="a"
        ),
        lambda s: service.change_tenant_policy(
            s, tenant="acme", changes={"tokens_per_minute": 900}, actor="b"
        ),
    )
    assert results == ["ok", "ok"]
    tenant = await service.get_tenant(world.session, name="acme")
    await world.session.refresh(tenant)
    assert tenant.limits is not None
    assert tenant.limits.get("requests_per_second") == 5
    assert tenant.limits.get("tokens_per_minute") == 900


async def test_removed_versions_and_deleted_artifacts_name_what_replicas_drop(world: World):
    """What another replica asks after any change: which versions it holds are retired or
    deleted now, and which of its local artifact copies only deleted versions name."""
    await world.register("bot", 1)
    await world.register("bot", 2)
    await world.register("bot", 3)
    rows = {v.version: v for v in await service.list_versions(world.session, name="bot")}
    await service.retire_version(world.session, name="bot", version=1, actor="ops")
    await service.delete_version(world.session, store=world.store, name="bot", version=2, actor="o")
    ids = [rows[n].id for n in (1, 2, 3)]
    assert await service.removed_versions(world.session, ids) == {ids[0], ids[1]}
    assert await service.removed_versions(world.session, []) == set()

    unknown = "0" * 64  # a registration may be storing it right now: not garbage
    digests = {rows[n].artifact_sha256 for n in (1, 2, 3)} | {unknown}
    assert await service.deleted_artifacts(world.session, digests) == {rows[2].artifact_sha256}
