"""`list_resolvable` (one query for all of a tenant's adapters: /v1/models and the gateway's
name cache) answers, name by name, what `resolve_adapter` answers, on SQLite and PostgreSQL:
the version served before a newer one was registered, the pinned stable while a canary runs,
the retired stable's successor, nothing when none is servable, and only what the tenant may
use."""

from __future__ import annotations

from dataclasses import replace

from registry import service
from tests.registry.rollout_world import World


async def test_one_query_answers_what_resolving_each_name_answers(world: World):
    await world.register("lr-newest", 1)
    await world.register("lr-newest", 2)
    await world.register("lr-retired-top", 3)
    await world.register("lr-retired-top", 4)
    await service.retire_version(world.session, name="lr-retired-top", version=2, actor="a")
    await world.register("lr-retired-stable", 3)
    await world.register("lr-retired-stable", 4)
    await service.retire_version(world.session, name="lr-retired-stable", version=1, actor="a")
    await world.register("lr-none", 5)
    await service.retire_version(world.session, name="lr-none", version=1, actor="a")
    await world.register("lr-canary", 6)
    await world.evaluated("lr-canary", 7)
    await service.start_rollout(world.session, name="lr-canary", version=2, actor="a")
    await world.register("lr-globex", 8, tenant="globex")
    await world.register("lr-shared", 9, tenant="globex")
    await service.share_adapter(world.session, name="lr-shared", tenant="acme", actor="a")

    listed = await service.list_resolvable(world.session, store=world.store, tenant="acme")
    by_name = {r.name: r for r in listed}
    # canary_1 is servable and newer, but `lr-canary` means its pinned stable
    assert {n: r.version for n, r in by_name.items()} == {
        "lr-canary": 1,
        "lr-newest": 1,  # v2 reaches the name through a canary only
        "lr-retired-stable": 2,  # its only successor
        "lr-retired-top": 1,
        "lr-shared": 1,
    }
    for name, entry in by_name.items():
        one = await service.resolve_adapter(
            world.session, store=world.store, model=name, tenant="acme"
        )
        assert entry.path is None and entry == replace(one, path=None)
    with_paths = await service.list_resolvable(
        world.session, store=world.store, tenant="acme", with_paths=True
    )
    assert all(r.path is not None and (r.path / "adapter_config.json").exists() for r in with_paths)
    everyone = await service.list_resolvable(world.session, store=world.store)
    assert {r.name for r in everyone} == {*by_name, "lr-globex"}
    other_base = await service.list_resolvable(
        world.session, store=world.store, tenant="acme", base_sha256="0" * 64
    )
    assert other_base == []
