"""The rank profile the gateway hands the paged pool at start (service.rank_profile), on SQLite
and PostgreSQL: every version that may take traffic on the base, by widest rank and module
set; retired versions and other bases are left out."""

from __future__ import annotations

from registry import service
from tests.registry.rollout_world import World


async def register(world: World, name: str, key: str, **lora: object) -> int:
    row = await service.register_adapter_version(
        world.session,
        store=world.store,
        artifact_dir=world.make_adapter(key, lora_alpha=8, **lora),
        name=name,
        tenant="acme",
        served_base=world.base_fp,
        max_lora_rank=16,
        actor="admin@acme",
    )
    return row.version


async def test_servable_versions_are_counted_by_rank_and_modules(world: World):
    assert await service.rank_profile(world.session, base_model="tiny") == []
    await register(world, "qv-a", "profile-qv-a", r=8, target_modules=["q_proj", "v_proj"])
    await register(world, "qv-b", "profile-qv-b", r=8, target_modules=["v_proj", "q_proj"])
    mlp = ["gate_proj", "up_proj", "down_proj"]
    await register(world, "mlp", "profile-mlp", r=4, target_modules=mlp)
    await register(world, "qo", "profile-qo", r=12, target_modules=["o_proj", "q_proj"])
    profile = await service.rank_profile(world.session, base_model="tiny")
    assert profile == [
        (4, ("down_proj", "gate_proj", "up_proj"), 1),
        (8, ("q_proj", "v_proj"), 2),
        (12, ("o_proj", "q_proj"), 1),
    ]
    await service.retire_version(world.session, name="mlp", version=1, actor="admin")
    profile = await service.rank_profile(world.session, base_model="tiny")
    assert [rank for rank, _, _ in profile] == [8, 12]  # a retired version takes no traffic
    assert await service.rank_profile(world.session, base_model="other-base") == []
