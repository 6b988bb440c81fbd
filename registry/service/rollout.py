"""Canary rollouts and rollbacks: the writes. Each call is one transaction that first takes the
adapter's write lock (rollout_views.load_adapter: FOR UPDATE on PostgreSQL, the database write
lock on SQLite), then decides on fresh rows, changes the rollout state, appends a rollout_events
row and an audit row, and bumps `rollout_updated_at`.

Version states (registry.states): start moves the canary evaluated/shadow → canary_1 (→ canary_10
→ canary_50 when starting higher); promote walks it up the ladder; complete makes it production
and the new stable. The previous stable keeps its state: it stays addressable as `name@N`, the
usual rollback path, until an admin retires it. A rolled-back canary becomes rolled_back and
starts again only with force=True. A breaching stable keeps its state too: its traffic moves to
the rollback target (`active_target`) until `restore_stable`.

Replicas race: promote and rollback take the version (and stage) the caller judged; when the
rollout has moved on they change nothing and return `acted=False` (another replica acted, or
the judged version no longer serves). Without those arguments (an admin) a call that cannot
apply raises instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import (
    InvalidInput,
    InvalidStateTransition,
    RegistryConflict,
    VersionNotFound,
)
from registry.models import Adapter, AdapterVersion, utcnow
from registry.rollout import (
    STAGE_STATES,
    STAGES,
    RolloutChange,
    RolloutView,
    next_stage,
)
from registry.service.lifecycle import move_state
from registry.service.rollout_fallback import fall_back
from registry.service.rollout_log import log_event
from registry.service.rollout_shadow import end_shadow
from registry.service.rollout_views import (
    arms_fallback,
    build_view,
    load_adapter,
    stable_below,
    stable_row,
    version_row,
)
from registry.states import VersionState

# What a monitor judged a version as, when it asks for a rollback.
JudgedRole = Literal["canary", "stable"]

LADDER = (
    VersionState.CANARY_1,
    VersionState.CANARY_10,
    VersionState.CANARY_50,
    VersionState.PRODUCTION,
)


async def start_rollout(
    session: AsyncSession,
    *,
    name: str,
    version: int,
    actor: str,
    percent: int = 1,
    force: bool = False,
    reason: str | None = None,
) -> RolloutView:
    """Send `percent` % (1, 10 or 50) of `name`'s traffic to `version`, the rest to the stable:
    the pinned stable, else the newest servable version below `version` (then pinned).

    `version` must be newer than the stable and allowed into canary_1 by the state machine
    (evaluated or shadow). A version rolled back before needs force=True. Raises
    AdapterNotFound, VersionNotFound, InvalidInput, RegistryConflict (a canary is already
    running) or InvalidStateTransition."""
    if percent not in STAGES[:-1]:
        raise InvalidInput(f"a canary starts at one of {STAGES[:-1]} %, not {percent}")
    adapter = await load_adapter(session, name, for_update=True)
    if adapter.canary_version is not None:
        raise RegistryConflict(
            f"{name}@{adapter.canary_version} is already in canary at {adapter.canary_percent} %;"
            " promote or roll it back first"
        )
    row = await version_row(session, adapter, version, for_update=True)
    if row is None:
        raise VersionNotFound(f"adapter {name!r} has no version {version}")
    stable = await stable_below(session, adapter, version)
    if stable is None:
        raise InvalidStateTransition(
            f"{name} has no servable version below {version} to keep serving the other "
            f"{100 - percent} %; a first version serves without a canary"
        )
    if version <= stable.version:
        raise InvalidInput(f"{name}@{version} is not newer than the stable {name}@{stable.version}")
    if row.state == VersionState.ROLLED_BACK and not force:
        when = adapter.rolled_back_at.isoformat() if adapter.rolled_back_at else "earlier"
        raise InvalidStateTransition(
            f"{name}@{version} was rolled back ({when}); start it again with force=True"
        )
    forced = row.state == VersionState.ROLLED_BACK
    _climb(row, STAGE_STATES[percent])  # a shadow version climbs shadow → canary_1 → …
    if adapter.shadow_version == version:
        # Its users now see its answers: mirroring them to it again would compare nothing.
        end_shadow(session, adapter, actor=actor, reason="canary started", state=None)
    adapter.stable_version = stable.version
    adapter.canary_version = version
    adapter.canary_percent = percent
    adapter.rollout_paused = False
    adapter.rollout_stage = "canary"
    log_event(
        session,
        adapter,
        "start",
        actor=actor,
        from_version=stable.version,
        to_version=version,
        percent=percent,
        reason=reason,
        details={"forced": True} if forced else None,
    )
    await session.commit()
    return await build_view(session, adapter)


async def promote(
    session: AsyncSession,
    *,
    name: str,
    actor: str,
    to_percent: int | None = None,
    version: int | None = None,
    from_percent: int | None = None,
    automatic: bool = False,
    reason: str | None = None,
) -> RolloutChange:
    """Move the canary to the next stage (or `to_percent`); at 100 % the rollout completes: the
    canary becomes production and the stable, and any stable fallback ends.

    `version`/`from_percent`: what the caller judged healthy. If the rollout has moved on (other
    canary, other stage, paused, finished), nothing changes (acted=False). Unconditional calls
    raise InvalidStateTransition instead (no canary, paused); a bad `to_percent` raises
    InvalidInput."""
    conditional = version is not None or from_percent is not None
    adapter = await load_adapter(session, name, for_update=True)
    current = adapter.canary_percent
    stale = (
        adapter.canary_version is None
        or adapter.rollout_paused
        or (version is not None and version != adapter.canary_version)
        or (from_percent is not None and from_percent != current)
    )
    if stale and conditional:
        return await _unchanged(session, adapter)
    if adapter.canary_version is None or current is None:
        raise InvalidStateTransition(f"{name} has no canary running")
    if adapter.rollout_paused:
        raise InvalidStateTransition(f"the rollout of {name}@{adapter.canary_version} is paused")
    target = next_stage(current) if to_percent is None else to_percent
    if target not in STAGES or target <= current:
        raise InvalidInput(f"cannot promote from {current} % to {to_percent} % (stages {STAGES})")
    canary = await version_row(session, adapter, adapter.canary_version, for_update=True)
    assert canary is not None  # versions are never removed, only tombstoned
    _climb(canary, STAGE_STATES[target])
    previous_stable = adapter.stable_version
    details: dict[str, Any] = {}
    if target == 100:
        action = "complete"
        if adapter.active_target is not None:
            details["ended_fallback_to"] = adapter.active_target
        adapter.stable_version = canary.version
        adapter.canary_version = None
        adapter.canary_percent = None
        adapter.active_target = None
        adapter.rollout_stage = "complete"
        if adapter.shadow_version is not None and adapter.shadow_version <= canary.version:
            # A shadow must be newer than the stable it is compared with.
            shadow = await version_row(session, adapter, adapter.shadow_version, for_update=True)
            details["ended_shadow"] = adapter.shadow_version
            end_shadow(
                session, adapter, actor=actor, reason="an equal or newer stable", state=shadow
            )
    else:
        action = "promote"
        adapter.canary_percent = target
    log_event(
        session,
        adapter,
        action,
        actor=actor,
        from_version=previous_stable,
        to_version=canary.version,
        percent=target,
        reason=reason,
        automatic=automatic,
        details=details or None,
    )
    await session.commit()
    return RolloutChange(await build_view(session, adapter), acted=True, action=action)


async def pause_rollout(
    session: AsyncSession, *, name: str, actor: str, reason: str | None = None
) -> RolloutView:
    """Freeze the canary at its stage: the split stays, promotions stop, rollbacks still
    apply. Pausing a paused rollout changes nothing. Raises InvalidStateTransition without a
    canary."""
    return await _set_paused(session, name=name, actor=actor, reason=reason, paused=True)


async def resume_rollout(
    session: AsyncSession, *, name: str, actor: str, reason: str | None = None
) -> RolloutView:
    """Undo pause_rollout (a running rollout: nothing changes)."""
    return await _set_paused(session, name=name, actor=actor, reason=reason, paused=False)


async def _set_paused(
    session: AsyncSession, *, name: str, actor: str, reason: str | None, paused: bool
) -> RolloutView:
    adapter = await load_adapter(session, name, for_update=True)
    if adapter.canary_version is None:
        raise InvalidStateTransition(f"{name} has no canary running")
    if adapter.rollout_paused != paused:
        adapter.rollout_paused = paused
        log_event(
            session,
            adapter,
            "pause" if paused else "resume",
            actor=actor,
            from_version=adapter.stable_version,
            to_version=adapter.canary_version,
            percent=adapter.canary_percent,
            reason=reason,
        )
    await session.commit()
    return await build_view(session, adapter)


async def rollback(
    session: AsyncSession,
    *,
    name: str,
    actor: str,
    reason: str,
    automatic: bool,
    figures: Mapping[str, Any] | None = None,
    version: int | None = None,
    role: JudgedRole | None = None,
    failing: Collection[str] = (),
) -> RolloutChange:
    """Take traffic away from a breaching version of `name`.

    The canary (when `version` is the canary, or `version` is None and one runs): it becomes
    rolled_back and all traffic returns to the stable. The stable (when `version` is the stable,
    or None and no canary runs): its traffic moves to the rollback target (the admin-set path,
    else the stable card's, else the base model), pinned to the version it reaches now and
    recorded as `active_target`. `failing` names addresses ("name@N", "name" or "base") the
    caller knows are breaching; a target among them, or an adapter itself in fallback, is
    refused.

    `role`: what `version` was judged as (a monitor's verdict). A canary verdict applies only
    while `version` is still the canary: once promoted to stable, the canary's evidence never
    moves the stable's traffic. A stable verdict never touches a canary, and an automatic one
    applies only while the stable is still armed (`arms_fallback`, re-read under the lock).

    Nothing changes (acted=False) when the judged version is already rolled back, already in
    fallback, no longer serves in the judged role, or (automatic, stable) is no longer armed.
    Raises AdapterNotFound or RollbackRefused (after auditing the refusal; the stable keeps
    serving)."""
    adapter = await load_adapter(session, name, for_update=True)
    stable = await stable_row(session, adapter)
    on_canary = adapter.canary_version is not None and version in (None, adapter.canary_version)
    if on_canary and role != "stable":
        return await _rollback_canary(
            session, adapter, actor=actor, reason=reason, automatic=automatic, figures=figures
        )
    acts_on_stable = (
        role != "canary"
        and stable is not None
        and version in (None, stable.version)
        and not (automatic and role == "stable" and not arms_fallback(adapter, stable))
    )
    if not acts_on_stable or adapter.active_target is not None:
        return await _unchanged(session, adapter)
    assert stable is not None
    await fall_back(
        session,
        adapter,
        stable,
        actor=actor,
        reason=reason,
        automatic=automatic,
        figures=figures,
        failing=failing,
    )
    return RolloutChange(await build_view(session, adapter), acted=True, action="stable_fallback")


async def _rollback_canary(
    session: AsyncSession,
    adapter: Adapter,
    *,
    actor: str,
    reason: str,
    automatic: bool,
    figures: Mapping[str, Any] | None,
) -> RolloutChange:
    assert adapter.canary_version is not None
    canary = await version_row(session, adapter, adapter.canary_version, for_update=True)
    assert canary is not None
    percent = adapter.canary_percent
    move_state(canary, VersionState.ROLLED_BACK)
    now = utcnow()
    adapter.canary_version = None
    adapter.canary_percent = None
    adapter.rollout_paused = False
    adapter.rollout_stage = "rolled_back"
    adapter.rolled_back_version = canary.version
    adapter.rolled_back_at = now
    log_event(
        session,
        adapter,
        "rollback",
        actor=actor,
        from_version=canary.version,
        to_version=adapter.stable_version,
        percent=percent,
        reason=reason,
        figures=figures,
        automatic=automatic,
    )
    await session.commit()
    return RolloutChange(await build_view(session, adapter), acted=True, action="rollback")


# ------------------------------------------------------------------------------ helpers


async def _unchanged(session: AsyncSession, adapter: Adapter) -> RolloutChange:
    view = await build_view(session, adapter)
    await session.commit()  # releases the row lock; nothing was changed
    return RolloutChange(view, acted=False)


def _climb(row: AdapterVersion, target: VersionState) -> None:
    """Walk `row` up the canary ladder to `target`, checking every step with the state
    machine (evaluated → canary_1 → canary_10 → …; no step is skipped)."""
    what = f"{row.adapter.name}@{row.version}"
    if row.state in LADDER and LADDER.index(row.state) >= LADDER.index(target):
        raise InvalidStateTransition(f"{what} is already {row.state.value}")
    start = LADDER.index(row.state) + 1 if row.state in LADDER else 0
    for step in LADDER[start : LADDER.index(target) + 1]:
        move_state(row, step)
