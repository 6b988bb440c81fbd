"""A stack's components resolve as its tenant would address them, on SQLite and PostgreSQL:
its own adapters and those shared with every tenant, never one lent to it alone or another
tenant's private one; `name` is the stable, `name@N` exactly N."""

from __future__ import annotations

import pytest

from registry import service
from registry.compat.problems import ProblemCode
from registry.errors import TenantNotFound
from registry.states import Visibility

CARD = {"owner": "ml@acme", "objective": "sft"}


async def resolve(world, *components: str, tenant: str = "acme"):
    return await service.resolve_stack(
        world.session,
        store=world.store,
        tenant=tenant,
        components=[(c, 1.0) for c in components],
        base_sha256=world.base_fp.weights_sha256,
    )


async def test_own_and_globally_shared_adapters_resolve_with_their_cards(world):
    await world.register("own", 1, card=CARD)
    await world.register("own", 2)  # not the stable yet: `own` stays v1
    await world.register("guard", 3, tenant="globex", visibility=Visibility.SHARED, card=CARD)
    parts, problems = await resolve(world, "own", "own@2", "guard")
    assert problems == []
    assert [(p.address, p.rank) for p in parts] == [("own@1", 3), ("own@2", 4), ("guard@1", 5)]
    assert [p.card is not None for p in parts] == [True, False, True]
    assert [p.owned for p in parts] == [True, True, False]
    for p in parts:  # fetched by the caller, once its session is closed
        path = await world.store.get_path(p.artifact_sha256)
        assert (path / "adapter_model.safetensors").is_file()


async def test_lent_private_and_unknown_adapters_are_refused_by_name(world):
    await world.register("lent", 1, tenant="globex", card=CARD)
    await world.register("hidden", 2, tenant="globex", card=CARD)
    await service.share_adapter(world.session, name="lent", tenant="acme", actor="root")
    parts, problems = await resolve(world, "lent", "hidden", "nowhere", "lent@9")
    assert parts == []
    assert [p.code for p in problems] == [ProblemCode.STACK_COMPONENT] * 4
    assert "belongs to tenant 'globex', which shared it with 'acme' alone" in problems[0].message
    assert problems[1].message.startswith("'hidden': no servable adapter")
    # the owner itself may stack them
    parts, problems = await resolve(world, "lent", "hidden", tenant="globex")
    assert problems == [] and [p.address for p in parts] == ["lent@1", "hidden@1"]


async def test_retired_versions_do_not_resolve(world):
    await world.register("old", 1, card=CARD)
    await service.retire_version(world.session, name="old", version=1, actor="root")
    _, problems = await resolve(world, "old@1", "old")
    assert [p.code for p in problems] == [ProblemCode.STACK_COMPONENT] * 2


async def test_an_unknown_tenant_is_not_found_rather_than_every_component(world):
    with pytest.raises(TenantNotFound):
        await resolve(world, "own", "guard", tenant="nobody")


class _NoDownloads:
    """A store whose downloads fail: resolving must not fetch (a download in the caller's
    session would hold its pooled connection idle in transaction)."""

    def __init__(self, store):
        self._store = store

    async def get_path(self, digest: str):
        raise AssertionError("resolve_stack downloaded an artifact inside the session")

    def __getattr__(self, name: str):
        return getattr(self._store, name)


async def test_resolving_downloads_nothing(world):
    await world.register("mine", 1, card=CARD)
    await world.register("mine-too", 2, card=CARD)
    parts, problems = await service.resolve_stack(
        world.session,
        store=_NoDownloads(world.store),
        tenant="acme",
        components=[("mine", 1.0), ("mine-too", 2.0)],
        base_sha256=world.base_fp.weights_sha256,
    )
    assert problems == [] and [p.weight for p in parts] == [1.0, 2.0]


async def test_a_stored_card_that_no_longer_validates_is_a_reason_not_a_crash(world):
    from sqlalchemy import update

    from registry.models import AdapterVersion

    await world.register("legacy", 1, card=CARD)
    await world.register("fresh", 2, card=CARD)
    row = await service.get_version(world.session, name="legacy", version=1)
    # as if stored under an older schema that had no `objective`
    await world.session.execute(
        update(AdapterVersion).where(AdapterVersion.id == row.id).values(card={"owner": "x"})
    )
    await world.session.commit()
    parts, problems = await resolve(world, "legacy", "fresh")
    assert [p.address for p in parts] == ["fresh@1"]
    assert [p.code for p in problems] == [ProblemCode.STACK_COMPONENT]
    assert problems[0].message.startswith("legacy@1's stored card no longer validates")
