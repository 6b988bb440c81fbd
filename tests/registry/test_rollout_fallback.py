"""A breaching stable version and its rollback path, on SQLite and on PostgreSQL, with real peft
adapters: fallback to the base, to another adapter of the same tenant, to an earlier version;
every refusal (another tenant's adapter, a cycle, a target that is itself failing); restoring;
and the per-adapter threshold override."""

from __future__ import annotations

from typing import Any

import pytest

from registry import service
from registry.compat import ProblemCode
from registry.errors import (
    AdapterNotFound,
    InvalidRollbackPath,
    InvalidStateTransition,
    InvalidThresholds,
    RollbackRefused,
)
from registry.rollout import Thresholds
from tests.registry.rollout_world import CALLERS, World

FIGURES = {"samples": 100, "p95_ttft_ms": 80.0, "p95_e2e_ms": 2400.0, "error_rate": 0.0}
ALL = len(CALLERS)


def card(**fields: Any) -> dict[str, Any]:
    return {"owner": "ml@acme", "objective": "sft", **fields}


async def breach(world: World, name: str, version: int | None = None, **kw: Any) -> Any:
    return await service.rollback(
        world.session,
        name=name,
        actor="gateway",
        reason="latency_p95",
        figures=FIGURES,
        automatic=True,
        version=version,
        **kw,
    )


async def test_fallback_to_the_base_and_restore(world: World):
    await world.register("acme-support", 1)  # no card: the rollback path is the base model
    change = await breach(world, "acme-support", version=1)
    assert (change.acted, change.action, change.view.active_target) == (
        True,
        "stable_fallback",
        "base",
    )
    assert (await world.routes("acme-support")) == {"base": ALL}
    # The version keeps its state and stays addressable; `name` is still the stable for admins.
    assert (await world.state("acme-support", 1)).value == "compatible"
    plain = await service.resolve_adapter(world.session, store=world.store, model="acme-support")
    assert plain.version == 1

    again = await breach(world, "acme-support", version=1)
    assert not again.acted and again.view.active_target == "base"

    view = await service.restore_stable(world.session, name="acme-support", actor="ops")
    assert view.active_target is None and view.stable_version == 1
    assert (await world.routes("acme-support")) == {"acme-support@1": ALL}
    same = await service.restore_stable(world.session, name="acme-support", actor="ops")
    assert same.updated_at == view.updated_at  # nothing to restore: nothing written

    events = await world.events("acme-support")
    assert [(e.action, e.from_version, e.to_version, e.target) for e in events] == [
        ("stable_restore", None, 1, "base"),
        ("stable_fallback", 1, None, "base"),
    ]
    assert events[1].figures == FIGURES and events[1].automatic
    actions = [a.action for a in await service.list_audit(world.session, limit=2)]
    assert actions == ["rollout.stable_restore", "rollout.stable_fallback"]


async def test_fallback_to_another_adapter_of_the_tenant(world: World):
    await world.register("acme-guard", 1)
    await world.register("acme-support", 1, card=card(rollback_path="acme-guard"))
    await service.share_adapter(world.session, name="acme-support", tenant="globex", actor="r")
    view = await service.rollout_status(world.session, name="acme-support")
    assert view.rollback_target == "acme-guard"  # from the stable's card

    change = await breach(world, "acme-support")
    assert change.view.active_target == "acme-guard@1"  # pinned to the version reached now
    assert (await world.routes("acme-support")) == {"acme-guard@1": ALL}
    # globex may use acme-support but not acme-guard: it is refused, not served acme's adapter.
    with pytest.raises(AdapterNotFound):
        await world.routes("acme-support", tenant="globex")
    with pytest.raises(InvalidStateTransition, match="fallback"):
        await service.retire_version(world.session, name="acme-guard", version=1, actor="x")


async def test_fallback_to_an_earlier_version_pins_the_stable(world: World):
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    await service.promote(world.session, name="acme-support", actor="ops", to_percent=100)
    view = await service.set_rollback_path(
        world.session, name="acme-support", target="acme-support@1", actor="ops"
    )
    assert view.rollback_target == "acme-support@1" and view.stable_version == 2
    change = await breach(world, "acme-support", version=2)
    assert change.view.active_target == "acme-support@1"
    await world.register("acme-support", 3)  # never takes the name by registering
    assert (await world.routes("acme-support")) == {"acme-support@1": ALL}
    view = await service.restore_stable(world.session, name="acme-support", actor="ops")
    assert (await world.routes("acme-support")) == {"acme-support@2": ALL}
    assert view.stable_version == 2

    # Pointing the path at the stable itself is caught when it is used.
    await service.set_rollback_path(
        world.session, name="acme-support", target="acme-support@2", actor="ops"
    )
    with pytest.raises(RollbackRefused, match="failing stable version itself"):
        await breach(world, "acme-support", version=2)


async def test_another_tenants_private_adapter_is_refused(world: World):
    await world.register("globex-private", 1, tenant="globex")
    await world.register("acme-support", 1)
    with pytest.raises(InvalidRollbackPath, match="another tenant") as refused:
        await service.set_rollback_path(
            world.session, name="acme-support", target="globex-private", actor="ops"
        )
    assert [p.code for p in refused.value.problems] == [ProblemCode.ROLLBACK_PATH_INVALID]

    # Shared when the path was set, unshared since: the fallback itself refuses it.
    await service.share_adapter(world.session, name="globex-private", tenant="acme", actor="r")
    await service.set_rollback_path(
        world.session, name="acme-support", target="globex-private", actor="ops"
    )
    await service.unshare_adapter(world.session, name="globex-private", tenant="acme", actor="r")
    with pytest.raises(RollbackRefused, match="another tenant"):
        await breach(world, "acme-support")
    view = await service.rollout_status(world.session, name="acme-support")
    assert view.active_target is None  # the stable keeps serving
    assert [e.action for e in await world.events("acme-support")] == []
    refusal = (await service.list_audit(world.session, action="rollout.fallback_refused"))[0]
    assert refusal.details["rollback_path"] == "globex-private"
    assert refusal.details["problems"][0]["code"] == "rollback_path_invalid"


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("base-ish", "does not exist"),
        ("acme-support", "points at the adapter itself"),
        ("acme-a", "leads back"),
        ("acme-b@1", "leads back"),
        ("acme-support@9", "no servable version"),
        ("Not A Name", "not an adapter address"),
    ],
)
async def test_invalid_rollback_paths(world: World, target: str, why: str):
    await world.register("acme-support", 1)
    await world.register("acme-b", 1, card=card(rollback_path="acme-support"))
    await world.register("acme-a", 1, card=card(rollback_path="acme-b"))
    with pytest.raises(InvalidRollbackPath, match=why):
        await service.set_rollback_path(
            world.session, name="acme-support", target=target, actor="ops"
        )


async def test_a_cycle_through_admin_set_paths_is_refused(world: World):
    await world.register("acme-a", 1)
    await world.register("acme-b", 1)
    await world.register("acme-c", 1)
    await service.set_rollback_path(world.session, name="acme-a", target="acme-b", actor="ops")
    await service.set_rollback_path(world.session, name="acme-b", target="acme-c@1", actor="ops")
    with pytest.raises(InvalidRollbackPath, match="leads back to 'acme-c'"):
        await service.set_rollback_path(world.session, name="acme-c", target="acme-a", actor="x")
    view = await service.set_rollback_path(world.session, name="acme-c", target=None, actor="x")
    assert view.rollback_target == "base"


async def test_a_failing_target_is_refused(world: World):
    await world.register("acme-guard", 1)
    await world.register("acme-support", 1, card=card(rollback_path="acme-guard"))
    # The caller knows the target is breaching too.
    for failing in (["acme-guard@1"], ["acme-guard"]):
        with pytest.raises(RollbackRefused, match="is failing too") as refused:
            await breach(world, "acme-support", failing=failing)
        assert refused.value.problems[0].code == ProblemCode.ROLLBACK_TARGET_FAILING
    # The target's own stable is in fallback already.
    await breach(world, "acme-guard")
    with pytest.raises(RollbackRefused, match=r"itself in fallback \(to base\)"):
        await breach(world, "acme-support")
    await service.restore_stable(world.session, name="acme-guard", actor="ops")
    change = await breach(world, "acme-support")
    assert change.view.active_target == "acme-guard@1"


async def test_a_failing_base_is_refused_like_a_failing_adapter(world: World):
    """The monitor names "base" among the failing addresses when the base model's own window
    breaches; a fallback into it was carried out anyway (review)."""
    await world.register("acme-support", 1)  # no card: the rollback path is the base
    with pytest.raises(RollbackRefused, match=r"base model.*failing too") as refused:
        await breach(world, "acme-support", version=1, failing={"base"})
    assert [p.code for p in refused.value.problems] == [ProblemCode.ROLLBACK_TARGET_FAILING]
    view = await service.rollout_status(world.session, name="acme-support")
    assert view.active_target is None and await world.event_count() == 0
    assert (await world.routes("acme-support")) == {"acme-support@1": ALL}
    audit = (await service.list_audit(world.session, action="rollout.fallback_refused"))[0]
    assert audit.details["rollback_path"] == "base"
    change = await breach(world, "acme-support", version=1, failing={"other@1"})
    assert change.acted and change.view.active_target == "base"


async def test_a_stale_canary_verdict_never_moves_the_stable_it_became(world: World):
    """Replica A judged canary v2 while another replica (or an admin) completed the rollout:
    A's verdict named version 2, which is now the unarmed stable, and moved its traffic to the
    base model (review). Judged as a canary, it is a no-op once v2 is no longer the canary."""
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    await service.promote(world.session, name="acme-support", actor="ops", to_percent=100)
    count = await world.event_count()
    change = await breach(world, "acme-support", version=2, role="canary")
    assert not change.acted and change.view.active_target is None
    assert change.view.stable_version == 2 and await world.event_count() == count
    assert (await world.routes("acme-support")) == {"acme-support@2": ALL}
    # Judged as a canary while it is one: rolled back as before.
    await world.evaluated("acme-support", 3)
    await service.start_rollout(world.session, name="acme-support", version=3, actor="ops")
    change = await breach(world, "acme-support", version=3, role="canary")
    assert (change.acted, change.action) == (True, "rollback")


async def test_an_automatic_stable_verdict_needs_the_stable_still_armed(world: World):
    """The monitor judged an armed stable; meanwhile an admin cleared its rollback path.
    Re-checked under the adapter's lock, the verdict changes nothing. An operator's own
    rollback (not automatic, or no role) still falls back to the base."""
    await world.register("acme-support", 1)
    await service.set_rollback_path(world.session, name="acme-support", target="base", actor="a")
    await service.set_rollback_path(world.session, name="acme-support", target=None, actor="a")
    change = await breach(world, "acme-support", version=1, role="stable")
    assert not change.acted and change.view.active_target is None
    manual = await service.rollback(
        world.session, name="acme-support", actor="ops", reason="manual", automatic=False
    )
    assert manual.acted and manual.view.active_target == "base"
    await service.restore_stable(world.session, name="acme-support", actor="ops")
    await service.set_rollback_path(world.session, name="acme-support", target="base", actor="a")
    change = await breach(world, "acme-support", version=1, role="stable")
    assert change.acted and change.view.active_target == "base"


async def test_a_stable_verdict_never_rolls_back_a_canary(world: World):
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    change = await breach(world, "acme-support", version=2, role="stable")
    assert not change.acted and change.view.canary_version == 2


async def test_stable_fallback_during_a_canary_and_completion_ends_it(world: World):
    await world.register("acme-support", 1)
    await world.evaluated("acme-support", 2)
    await service.start_rollout(world.session, name="acme-support", version=2, actor="ops")
    await service.promote(world.session, name="acme-support", actor="ops")
    change = await breach(world, "acme-support", version=1)  # the stable breached, not v2
    assert change.view.active_target == "base" and change.view.canary_version == 2
    routes = await world.routes("acme-support")
    assert set(routes) == {"base", "acme-support@2"} and routes["acme-support@2"] > 0

    change = await service.promote(world.session, name="acme-support", actor="ops", to_percent=100)
    assert change.view.active_target is None and change.view.stable_version == 2
    assert (await world.routes("acme-support")) == {"acme-support@2": ALL}
    audit = (await service.list_audit(world.session, action="rollout.complete"))[0]
    assert audit.details["ended_fallback_to"] == "base"


async def test_threshold_override(world: World):
    await world.register(
        "acme-support",
        1,
        card=card(sla={"p95_ttft_ms": 85}, rollback={"margin_ms": 15, "error_rate": 0.001}),
    )
    view = await service.set_thresholds(
        world.session,
        name="acme-support",
        thresholds={"margin_ms": 30, "max_p95_e2e_ms": 2000},
        actor="ops",
    )
    assert view.threshold_override == {"margin_ms": 30.0, "max_p95_e2e_ms": 2000.0}
    limits = view.thresholds(1, Thresholds(window=500))
    assert (limits.sla_p95_ttft_ms, limits.margin_ms, limits.max_p95_e2e_ms) == (85, 30, 2000)
    assert (limits.window, limits.max_error_rate) == (100, 0.001)  # the card's

    with pytest.raises(InvalidThresholds) as refused:
        await service.set_thresholds(
            world.session, name="acme-support", thresholds={"window": 0, "tll": 1}, actor="ops"
        )
    assert len(refused.value.problems) == 2
    view = await service.set_thresholds(
        world.session, name="acme-support", thresholds=None, actor="ops"
    )
    assert view.threshold_override is None
    audit = await service.list_audit(world.session, action="rollout.thresholds", limit=2)
    assert [a.details["to"] for a in audit] == [None, {"margin_ms": 30.0, "max_p95_e2e_ms": 2000.0}]


# ------------------------------------------------------------------ what arms automatic fallback


async def test_only_an_asked_for_rollback_path_arms_automatic_fallback(world: World):
    await world.register("plain", 1)  # no card: base is the manual path only
    await world.register("carded", 1, card=card())  # a card that names nothing
    await world.register("triggers", 1, card=card(rollback={"error_rate": 0.01}))
    await world.register("acme-guard", 1)
    await world.register("pathed", 1, card=card(rollback_path="acme-guard"))
    armed = {}
    for name in ("plain", "carded", "triggers", "pathed"):
        armed[name] = (await service.rollout_status(world.session, name=name)).auto_fallback
    assert armed == {"plain": False, "carded": False, "triggers": True, "pathed": True}

    view = await service.set_rollback_path(world.session, name="plain", target="base", actor="ops")
    assert view.auto_fallback and view.watched and not view.steers


async def test_replicas_hear_of_armed_adapters_and_of_new_stables(world: World):
    """An armed card stamps the adapter (polling replicas load its view); once stamped, a
    retired stable stamps it again, so no replica judges a stale stable. A new version changes
    no stable: it is not stamped for it."""
    await world.register("plain", 1)
    assert await service.list_rollouts(world.session) == []  # nothing to watch, nothing listed
    await world.register("triggers", 1, card=card(rollback={"error_rate": 0.01}))
    [view] = await service.list_rollouts(world.session)
    assert view.name == "triggers" and view.stable_version == 1 and view.auto_fallback
    mark = view.updated_at
    await world.register("triggers", 2)
    [view] = await service.list_rollouts(world.session)
    assert view.stable_version == 1 and view.updated_at == mark
    await service.retire_version(world.session, name="triggers", version=1, actor="ops")
    [view] = await service.list_rollouts(world.session, since=mark)
    assert view.stable_version == 2 and view.updated_at > mark
    assert not view.auto_fallback  # v2 has no card: nothing arms it
