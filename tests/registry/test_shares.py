"""Explicit adapter shares and what each tenant can see, on SQLite and on PostgreSQL, with real
peft adapters registered through the service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from registry import service
from registry.compat import BaseModelFingerprint, ProblemCode
from registry.errors import AdapterNotFound, AdapterRejected, InvalidInput, TenantNotFound
from registry.states import Visibility
from registry.store.local import LocalArtifactStore

TENANTS = ("acme", "globex", "initech")


class World:
    def __init__(self, session: AsyncSession, store: LocalArtifactStore, base_fp, adapter: Path):
        self.session, self.store, self.base_fp, self.adapter = session, store, base_fp, adapter

    async def register(self, name: str, tenant: str, **kw: Any) -> None:
        await service.register_adapter_version(
            self.session,
            store=self.store,
            artifact_dir=self.adapter,
            name=name,
            tenant=tenant,
            served_base=self.base_fp,
            max_lora_rank=16,
            actor=f"admin@{tenant}",
            **kw,
        )

    async def visible(self, tenant: str | None) -> list[str]:
        listed = await service.list_resolvable(self.session, store=self.store, tenant=tenant)
        return [r.name for r in listed]

    async def resolves(self, name: str, tenant: str) -> bool:
        try:
            await service.resolve_adapter(self.session, store=self.store, model=name, tenant=tenant)
        except AdapterNotFound:
            return False
        return True

    async def share(self, name: str, tenant: str, actor: str = "root") -> None:
        await service.share_adapter(self.session, name=name, tenant=tenant, actor=actor)

    async def unshare(self, name: str, tenant: str, actor: str = "root") -> None:
        await service.unshare_adapter(self.session, name=name, tenant=tenant, actor=actor)


@pytest.fixture
async def world(
    session: AsyncSession,
    store: LocalArtifactStore,
    base_fp: BaseModelFingerprint,
    good_adapter: Path,
) -> World:
    await service.register_base_model(session, name="tiny", fingerprint=base_fp, actor="system")
    for tenant in TENANTS:
        await service.create_tenant(session, name=tenant, actor="root")
    return World(session, store, base_fp, good_adapter)


async def test_a_private_adapter_is_visible_only_while_shared(world: World):
    await world.register("acme-private", "acme")
    assert not await world.resolves("acme-private", "globex")
    assert "acme-private" not in await world.visible("globex")

    await world.share("acme-private", "globex", actor="owner@acme")
    assert await world.resolves("acme-private", "globex")
    assert await world.resolves("acme-private@1", "globex")
    assert await world.visible("globex") == ["acme-private"]
    assert not await world.resolves("acme-private", "initech")  # shared with globex only
    assert await world.visible("initech") == []
    assert await service.list_adapter_shares(world.session, name="acme-private") == ["globex"]

    await world.unshare("acme-private", "globex", actor="owner@acme")
    assert not await world.resolves("acme-private", "globex")
    assert await world.visible("globex") == []
    assert await world.resolves("acme-private", "acme")  # the owner is unaffected
    assert await service.list_adapter_shares(world.session, name="acme-private") == []

    actions = [
        (e.action, e.actor, e.details)
        for e in await service.list_audit(world.session, target="adapter:acme-private")
    ]
    assert actions[:2] == [
        ("adapter.unshare", "owner@acme", {"tenant": "globex"}),
        ("adapter.share", "owner@acme", {"tenant": "globex"}),
    ]


async def test_the_visibility_matrix(world: World):
    await world.register("acme-private", "acme")
    await world.register("acme-internal", "acme")
    await world.register("globex-public", "globex", visibility=Visibility.SHARED)
    await world.register("initech-private", "initech")
    await world.share("acme-private", "globex")
    await world.share("initech-private", "acme")
    expected = {
        "acme": ["acme-internal", "acme-private", "globex-public", "initech-private"],
        "globex": ["acme-private", "globex-public"],
        "initech": ["globex-public", "initech-private"],
    }
    everything = sorted({name for names in expected.values() for name in names})
    assert await world.visible(None) == everything
    for tenant, names in expected.items():
        assert await world.visible(tenant) == names, tenant
        for name in everything:
            assert await world.resolves(name, tenant) == (name in names), (tenant, name)
        listed = await service.list_adapters(world.session, tenant=tenant)
        assert [a.name for a in listed] == names
        owned = await service.list_adapters(world.session, tenant=tenant, include_shared=False)
        assert [a.name for a in owned] == [n for n in names if n.startswith(tenant)]


async def test_sharing_is_idempotent_and_refused_to_the_owner(world: World):
    await world.register("acme-private", "acme")
    with pytest.raises(InvalidInput):
        await world.share("acme-private", "acme")
    await world.share("acme-private", "globex")
    await world.share("acme-private", "globex")
    await world.share("acme-private", "initech")
    assert await service.list_adapter_shares(world.session, name="acme-private") == [
        "globex",
        "initech",
    ]
    assert len(await service.list_audit(world.session, action="adapter.share")) == 2
    await world.unshare("acme-private", "globex")
    await world.unshare("acme-private", "globex")  # not shared any more: nothing to do
    assert len(await service.list_audit(world.session, action="adapter.unshare")) == 1
    assert await world.visible("initech") == ["acme-private"]


async def test_sharing_unknown_things(world: World):
    await world.register("acme-private", "acme")
    with pytest.raises(AdapterNotFound):
        await world.share("no-such", "globex")
    with pytest.raises(TenantNotFound):
        await world.share("acme-private", "nobody")
    with pytest.raises(AdapterNotFound):
        await world.unshare("no-such", "globex")
    with pytest.raises(AdapterNotFound):
        await service.list_adapter_shares(world.session, name="no-such")


@contextmanager
def statements(session: AsyncSession) -> Iterator[list[str]]:
    seen: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sync_engine = session.bind.sync_engine  # type: ignore[union-attr]
    event.listen(sync_engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(sync_engine, "before_cursor_execute", capture)


async def test_listing_does_not_look_up_shares_per_adapter(world: World):
    for i in range(5):
        await world.register(f"acme-{i}", "acme")
        await world.share(f"acme-{i}", "globex")
    await world.register("globex-own", "globex")
    with statements(world.session) as seen:
        assert len(await world.visible("globex")) == 6
    assert sum("adapter_shares" in s for s in seen) == 1
    with statements(world.session) as seen:
        assert await world.resolves("acme-3", "globex")
    assert sum("adapter_shares" in s for s in seen) == 1


async def test_a_rollback_path_may_name_an_adapter_shared_with_the_tenant(world: World):
    await world.register("globex-guard", "globex")
    card = {"owner": "ml@acme", "objective": "sft", "rollback_path": "globex-guard"}
    with pytest.raises(AdapterRejected) as refused:
        await world.register("acme-bot", "acme", card=card)
    assert [p.code for p in refused.value.problems] == [ProblemCode.ROLLBACK_PATH_INVALID]
    await world.share("globex-guard", "acme")
    await world.register("acme-bot", "acme", card=card)
