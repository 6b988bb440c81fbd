"""service.version_address: a version row id back to its adapter name and version number, on
SQLite and PostgreSQL, whatever the version's state (feedback names responses of retired
versions too)."""

from __future__ import annotations

from registry import service
from tests.registry.rollout_world import World


async def row_id(world: World, name: str, n: int) -> int:
    version = await world.register(name, n)
    return (await service.get_version(world.session, name=name, version=version)).id


async def test_a_row_id_names_its_adapter_and_version_in_any_state(world: World):
    first = await row_id(world, "addressed", 1)
    second = await row_id(world, "addressed", 2)
    assert await service.version_address(world.session, version_id=first) == ("addressed", 1)
    assert await service.version_address(world.session, version_id=second) == ("addressed", 2)
    await service.retire_version(world.session, name="addressed", version=1, actor="admin")
    assert await service.version_address(world.session, version_id=first) == ("addressed", 1)
    assert await service.version_address(world.session, version_id=second + 1000) is None
