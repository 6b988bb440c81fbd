"""A breaching stable version's safety net: where its traffic goes (the rollback path, checked
again when used), falling back and restoring, and the thresholds that judge the adapter.

A fallback is a routing change on the adapter (`active_target`), never a state change of the
immutable version: the breach may have been the infrastructure's, and restoring must be possible.
The target is pinned to the concrete version it reaches when falling back ("other@3", not
"other"), so the traffic does not follow later rollouts of another adapter unchecked.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.compat.problems import Problem, ProblemCode
from registry.errors import InvalidRollbackPath, RollbackRefused
from registry.models import Adapter, AdapterVersion
from registry.naming import parse_address
from registry.rollout import RolloutView, validate_threshold_override
from registry.service.audit import record
from registry.service.rollback_paths import resolve_target, rollback_path_problems
from registry.service.rollout_log import log_event, touch
from registry.service.rollout_views import build_view, load_adapter, rollback_target
from registry.states import SERVABLE


async def fall_back(
    session: AsyncSession,
    adapter: Adapter,
    stable: AdapterVersion,
    *,
    actor: str,
    reason: str,
    automatic: bool,
    figures: Mapping[str, Any] | None,
    failing: Collection[str],
) -> None:
    """Move the (locked) adapter's stable traffic to its rollback target and commit, or audit
    the refusal, commit that and raise RollbackRefused. Called by rollout.rollback."""
    target = await _fallback_target(session, adapter, stable, failing=failing, actor=actor)
    adapter.stable_version = stable.version  # pin it: a new registration must not take over
    adapter.active_target = target
    log_event(
        session,
        adapter,
        "stable_fallback",
        actor=actor,
        from_version=stable.version,
        target=target,
        reason=reason,
        figures=figures,
        automatic=automatic,
    )
    await session.commit()


async def _fallback_target(
    session: AsyncSession,
    adapter: Adapter,
    stable: AdapterVersion,
    *,
    failing: Collection[str],
    actor: str,
) -> str:
    """The concrete address ("base" or "name@N") the stable's traffic may move to, or audit
    the refusal, commit it and raise RollbackRefused."""
    path = rollback_target(adapter, stable)
    problems = await rollback_path_problems(
        session,
        target=path,
        name=adapter.name,
        tenant=adapter.tenant,
        base=adapter.base_model,
        adapter_level=True,
    )
    concrete = "base"
    if not problems and path == "base" and "base" in failing:
        message = "rollback_path 'base' (the base model) is failing too"
        problems = [Problem(ProblemCode.ROLLBACK_TARGET_FAILING, message)]
    elif not problems and path != "base":
        reached = await resolve_target(session, parse_address(path))
        assert reached is not None  # rollback_path_problems checked it is servable
        concrete = f"{reached.adapter.name}@{reached.version}"
        if not await _still_servable(session, reached):
            problems = [
                Problem(
                    ProblemCode.ROLLBACK_PATH_INVALID,
                    f"rollback target {concrete} was retired or deleted meanwhile",
                )
            ]
        else:
            problems = _failing_problems(
                path, reached, stable=stable, adapter=adapter, failing=failing
            )
    if not problems:
        return concrete
    refused = [p.as_dict() for p in problems]
    record(
        session,
        actor=actor,
        action="rollout.fallback_refused",
        target=f"adapter:{adapter.name}",
        details={"version": stable.version, "rollback_path": path, "problems": refused},
    )
    await session.commit()
    raise RollbackRefused(problems)


async def _still_servable(session: AsyncSession, target: AdapterVersion) -> bool:
    """Hold the target version's row (shared) until the fallback commits: a retire or delete
    of it, which locks that row for update, then waits and sees the fallback (and refuses);
    one that committed first is seen here (PostgreSQL; SQLite's write lock, taken with the
    adapter's, already orders the two)."""
    query = (
        select(AdapterVersion.state)
        .where(AdapterVersion.id == target.id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    return await session.scalar(query) in SERVABLE


def _failing_problems(
    path: str,
    reached: AdapterVersion,
    *,
    stable: AdapterVersion,
    adapter: Adapter,
    failing: Collection[str],
) -> list[Problem]:
    address = f"{reached.adapter.name}@{reached.version}"

    def refuse(why: str) -> list[Problem]:
        message = f"rollback_path {path!r} ({address}) {why}"
        return [Problem(ProblemCode.ROLLBACK_TARGET_FAILING, message)]

    if reached.id == stable.id:
        return refuse("is the failing stable version itself")
    if address in failing or reached.adapter.name in failing:
        return refuse("is failing too")
    other = reached.adapter
    if other.id != adapter.id and other.active_target is not None:
        return refuse(f"is itself in fallback (to {other.active_target})")
    return []


async def restore_stable(
    session: AsyncSession, *, name: str, actor: str, reason: str | None = None
) -> RolloutView:
    """End a stable fallback: traffic returns to the stable version. Not in fallback: nothing
    changes. Raises AdapterNotFound."""
    adapter = await load_adapter(session, name, for_update=True)
    if adapter.active_target is not None:
        log_event(
            session,
            adapter,
            "stable_restore",
            actor=actor,
            to_version=adapter.stable_version,
            target=adapter.active_target,
            reason=reason,
        )
        adapter.active_target = None
    await session.commit()
    return await build_view(session, adapter)


async def set_rollback_path(
    session: AsyncSession, *, name: str, target: str | None, actor: str
) -> RolloutView:
    """Set where `name`'s stable goes when it breaches ("base", "other", "other@N", or an
    earlier "name@N"), overriding the cards; None returns to the stable card's path. Raises
    AdapterNotFound or InvalidRollbackPath (missing, unservable, other base, another tenant's,
    a cycle)."""
    adapter = await load_adapter(session, name, for_update=True)
    if target is not None:
        problems = await rollback_path_problems(
            session,
            target=target,
            name=name,
            tenant=adapter.tenant,
            base=adapter.base_model,
            adapter_level=True,
        )
        if problems:
            raise InvalidRollbackPath(problems)
    previous = adapter.rollback_path
    adapter.rollback_path = target
    touch(adapter)
    record(
        session,
        actor=actor,
        action="rollout.rollback_path",
        target=f"adapter:{name}",
        details={"from": previous, "to": target},
    )
    await session.commit()
    return await build_view(session, adapter)


async def set_thresholds(
    session: AsyncSession, *, name: str, thresholds: Mapping[str, Any] | None, actor: str
) -> RolloutView:
    """Replace `name`'s threshold override (registry.rollout.Thresholds field names; only the
    keys given apply, before its cards); None removes it. Raises AdapterNotFound or
    InvalidThresholds listing every problem."""
    stored = validate_threshold_override(thresholds) if thresholds is not None else None
    adapter = await load_adapter(session, name, for_update=True)
    previous = adapter.rollout_thresholds
    adapter.rollout_thresholds = stored
    touch(adapter)
    record(
        session,
        actor=actor,
        action="rollout.thresholds",
        target=f"adapter:{name}",
        details={"from": previous, "to": stored},
    )
    await session.commit()
    return await build_view(session, adapter)
