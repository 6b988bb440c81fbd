"""The registry's change generation (what each gateway replica polls to drop its caches), on
SQLite and PostgreSQL: it moves with every admin write and only then."""

from __future__ import annotations

from registry import service
from tests.registry.rollout_world import World


async def test_every_admin_write_moves_the_generation_and_reads_do_not(world: World):
    seen = [await service.change_generation(world.session)]
    assert seen[0][0] > 0  # the world's base model and tenants were written through the service

    async def moved() -> bool:
        seen.append(await service.change_generation(world.session))
        return seen[-1] > seen[-2]

    await world.register("gen-a", 1)
    assert await moved()
    await service.list_adapters(world.session, tenant="acme")
    await service.resolve_adapter(world.session, store=world.store, model="gen-a")
    assert not await moved()
    await service.share_adapter(world.session, name="gen-a", tenant="globex", actor="admin")
    assert await moved()
    await service.retire_version(world.session, name="gen-a", version=1, actor="admin")
    assert await moved()
    issued = await service.create_api_key(world.session, tenant="acme", actor="admin")
    assert await moved()
    await service.revoke_api_key(world.session, key_id=issued.key.key_id, actor="admin")
    assert await moved()


async def test_a_write_that_commits_after_a_newer_one_still_moves_it(world: World):
    """PostgreSQL hands out audit ids at flush: a transaction holding id N may commit after
    N+1 was already read. Simulated by adding a row with an id below the newest."""
    from registry.models import AuditEntry

    await world.register("gen-late", 1)
    await world.register("gen-late", 2)
    newest, _ = before = await service.change_generation(world.session)
    world.session.add(
        AuditEntry(id=newest + 1, actor="a", action="tenant.create", target="x", details={})
    )
    world.session.add(
        AuditEntry(id=newest + 3, actor="a", action="tenant.create", target="y", details={})
    )
    await world.session.commit()
    seen = await service.change_generation(world.session)
    world.session.add(  # "flushed" before newest + 3, committed after it was seen
        AuditEntry(id=newest + 2, actor="a", action="tenant.create", target="z", details={})
    )
    await world.session.commit()
    late = await service.change_generation(world.session)
    assert before != seen != late and late[0] == seen[0] == newest + 3
