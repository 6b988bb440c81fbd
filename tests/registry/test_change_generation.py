"""The registry's change generation (what each gateway replica polls to drop its caches), on
SQLite and PostgreSQL: it moves with every admin write and only then."""

from __future__ import annotations

from registry import service
from tests.registry.rollout_world import World


async def test_every_admin_write_moves_the_generation_and_reads_do_not(world: World):
    seen = [await service.change_generation(world.session)]
    assert seen[0] > 0  # the world's base model and tenants were written through the service

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
