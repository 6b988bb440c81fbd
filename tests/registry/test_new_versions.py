"""What the bare name serves as versions come and go, on SQLite and PostgreSQL: an adapter's
first version serves at once; a later one never takes the name by being registered (it was:
v2, never evaluated, got 100 % of the traffic with no canary, review), only through the
canary ladder, while `name@N` reaches it at once; retiring the stable hands the name to a
documented successor."""

from __future__ import annotations

import pytest

from registry import service
from registry.errors import AdapterNotFound
from registry.states import VersionState
from tests.registry.rollout_world import CALLERS, World

S = VersionState
ALL = len(CALLERS)
NAME = "acme-support"


async def named(world: World) -> int:
    resolved = await service.resolve_adapter(world.session, store=world.store, model=NAME)
    listed = await service.list_resolvable(world.session, store=world.store, tenant="acme")
    assert [r.version for r in listed if r.name == NAME] == [resolved.version]
    return resolved.version


async def test_a_new_version_reaches_the_name_only_through_a_canary(world: World):
    await world.register(NAME, 1)
    assert (await world.routes(NAME)) == {f"{NAME}@1": ALL}  # a first version serves at once
    await world.register(NAME, 2)
    assert await world.state(NAME, 2) == S.COMPATIBLE
    assert (await world.routes(NAME)) == {f"{NAME}@1": ALL}
    assert await named(world) == 1
    view = await service.rollout_status(world.session, name=NAME)
    assert (view.stable_version, view.canary_version) == (1, None)
    explicit = await service.resolve_adapter(world.session, store=world.store, model=f"{NAME}@2")
    assert explicit.version == 2  # pinned clients and admins reach it
    audit = (await service.list_audit(world.session, action="adapter_version.register"))[0]
    assert audit.details["version"] == 2 and audit.details["stable_version"] == 1

    await service.mark_evaluated(world.session, name=NAME, version=2, actor="evals")
    await service.start_rollout(world.session, name=NAME, version=2, actor="ops")
    routes = await world.routes(NAME)
    assert 0 < routes[f"{NAME}@2"] < routes[f"{NAME}@1"]  # 1 %
    for _ in range(3):
        await service.promote(world.session, name=NAME, actor="ops")  # 10, 50, 100 %
    assert (await world.routes(NAME)) == {f"{NAME}@2": ALL}


async def test_retiring_the_stable_hands_the_name_to_a_documented_successor(world: World):
    await world.register(NAME, 1)
    await world.evaluated(NAME, 2)
    await service.start_rollout(world.session, name=NAME, version=2, actor="ops")
    await service.promote(world.session, name=NAME, actor="ops", to_percent=100)
    await world.register(NAME, 3)  # never evaluated
    assert await named(world) == 2

    # The newest servable version below the stable: what served before it, not v3.
    await service.retire_version(world.session, name=NAME, version=2, actor="ops")
    assert await named(world) == 1
    assert (await service.rollout_status(world.session, name=NAME)).stable_version == 1
    # None below: the newest above, which the operator leaves as the only choice.
    await service.retire_version(world.session, name=NAME, version=1, actor="ops")
    assert await named(world) == 3
    # Nothing left: the name serves nothing; a version registered then serves at once.
    await service.retire_version(world.session, name=NAME, version=3, actor="ops")
    with pytest.raises(AdapterNotFound):
        await named(world)
    await world.register(NAME, 4)
    assert await named(world) == 4
    await world.register(NAME, 5)
    assert await named(world) == 4
    retires = await service.list_audit(world.session, action="adapter_version.retire")
    assert [a.details.get("stable_version") for a in reversed(retires)] == [1, 3, None]


async def test_deleting_an_unpinned_newest_version_keeps_the_rule(world: World):
    """An adapter written before registration pinned its stable (stable_version None, two
    servable versions: the newest served). Deleting that newest version moves the name to the
    next one down, as retiring a stable does; registering then pins what serves."""
    await world.register(NAME, 1)
    await world.register(NAME, 2)
    adapter = await service.get_adapter(world.session, name=NAME)
    adapter.stable_version = None  # as an older gateway left it
    await world.session.commit()
    assert await named(world) == 2
    await world.register(NAME, 3)  # pins v2, which served
    assert await named(world) == 2
    adapter.stable_version = None
    await world.session.commit()
    assert await named(world) == 3
    await service.delete_version(world.session, store=world.store, name=NAME, version=3, actor="a")
    assert await named(world) == 2
    assert (await service.rollout_status(world.session, name=NAME)).stable_version == 2


async def test_a_retired_stable_hands_the_name_to_the_version_it_replaced(world: World):
    await world.register(NAME, 1)  # serves
    await world.register(NAME, 2)  # compatible: never evaluated, never served
    await world.evaluated(NAME, 3)
    await service.start_rollout(world.session, name=NAME, version=3, actor="ops")
    await service.promote(world.session, name=NAME, actor="ops", to_percent=100)
    assert await named(world) == 3
    await service.retire_version(world.session, name=NAME, version=3, actor="ops")
    # v1, which v3's rollout replaced; v2, newer, would take the name with no canary at all.
    assert await named(world) == 1


async def test_an_evaluated_version_succeeds_before_one_never_evaluated(world: World):
    await world.register(NAME, 1)  # serves
    await world.evaluated(NAME, 2)
    await world.register(NAME, 3)  # compatible only
    await service.retire_version(world.session, name=NAME, version=1, actor="ops")
    assert await named(world) == 2
    await service.retire_version(world.session, name=NAME, version=2, actor="ops")
    assert await named(world) == 3  # nothing else is left


async def test_an_armed_successor_reaches_the_replicas_that_judge_it(world: World):
    await world.register("armed", 1)  # no card: no replica holds a view of it
    armed = {"owner": "ml@acme", "objective": "sft", "rollback": {"error_rate": 0.01}}
    await world.register("armed", 2, card=armed)  # arms a fallback; pinned away from the name
    await service.retire_version(world.session, name="armed", version=1, actor="ops")
    view = await service.rollout_status(world.session, name="armed")
    assert view.stable_version == 2 and view.auto_fallback
    # Stamped, so every replica's rollout router loads it and its monitor judges it.
    assert [v.name for v in await service.list_rollouts(world.session)] == ["armed"]
