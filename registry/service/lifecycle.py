"""Marking versions evaluated, retiring and deleting them. Each is a state change on the immutable
version row, audited; delete also removes the artifact once no live version references it any
more. A version the rollout is routing to (a running canary or shadow, the stable while either
runs, a fallback target) is refused until the rollout moves on."""

from __future__ import annotations

import logging
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from registry.errors import InvalidStateTransition
from registry.models import Adapter, AdapterVersion, RolloutEvent, utcnow
from registry.service.audit import record
from registry.service.queries import (
    artifact_references,
    current_version,
    get_version,
    lock_artifact,
)
from registry.service.rollout_log import touch, touch_if_tracked
from registry.service.rollout_views import arms_fallback, version_row
from registry.states import SERVABLE, VersionState, check_transition
from registry.store.base import ArtifactStore

logger = logging.getLogger(__name__)
DIGESTS_PER_QUERY = 500  # well under SQLite's and PostgreSQL's bound parameter limits


async def mark_evaluated(
    session: AsyncSession,
    *,
    name: str,
    version: int,
    actor: str,
    reason: str | None = None,
    evidence: dict[str, object] | None = None,
) -> AdapterVersion:
    """Record that a compatible version passed its evaluation (compatible → evaluated), the
    state a canary starts from. `reason`: what was run (e.g. an eval report's id); `evidence`:
    a summary of the eval report the gateway checked, kept in the audit row."""
    row = await get_version(session, name=name, version=version, for_update=True)
    previous = row.state
    move_state(row, VersionState.EVALUATED)
    details: dict[str, object] = {"version": version, "from": previous.value, "reason": reason}
    if evidence is not None:
        details["evidence"] = evidence
    record(
        session,
        actor=actor,
        action="adapter_version.evaluate",
        target=f"adapter:{name}",
        details=details,
    )
    await session.commit()
    return row


async def retire_version(
    session: AsyncSession, *, name: str, version: int, actor: str, reason: str | None = None
) -> AdapterVersion:
    """Stop serving a version for good (kept for audit and as a deletion candidate). Refused
    for a running canary, the stable while a canary runs, and a stable fallback's target.

    Retiring the version `name` serves (its stable) hands the name to a successor, pinned as
    the new stable: the newest servable version below it (what served before it, the usual
    way back), else the newest servable version above it (an operator who retires the only
    older version chose the newer one), else none (`name` serves nothing)."""
    row = await get_version(session, name=name, version=version, for_update=True)
    await _refuse_routed(session, row)
    adapter = row.adapter
    served = await current_version(session, adapter)
    previous = row.state
    move_state(row, VersionState.RETIRED)
    details: dict[str, object] = {"version": version, "from": previous.value, "reason": reason}
    if served is not None and served.id == row.id:
        adapter.stable_version = await _successor(session, row)
        details["stable_version"] = adapter.stable_version
        await _stamp_new_stable(adapter, adapter.stable_version, session)
    else:
        touch_if_tracked(adapter)
    record(
        session,
        actor=actor,
        action="adapter_version.retire",
        target=f"adapter:{name}",
        details=details,
    )
    await session.commit()
    return row


async def delete_version(
    session: AsyncSession,
    *,
    store: ArtifactStore,
    name: str,
    version: int,
    actor: str,
    reason: str | None = None,
) -> AdapterVersion:
    """Tombstone a version and delete its artifact if nothing else uses it (seed §6: contract
    end). Live versions (shadow/canary/production, or the rollout's pointers) are refused, the
    pinned stable too (retire it first: that picks its successor)."""
    row = await get_version(session, name=name, version=version, for_update=True)
    adapter = row.adapter
    # A retired stable serves nothing (retiring it moved the name to its successor), so it
    # may go: README's retire-then-delete works after a rollout too.
    serving_stable = version == adapter.stable_version and row.state in SERVABLE
    if serving_stable or version == adapter.canary_version:
        raise InvalidStateTransition(
            f"{name}@{version} is the adapter's stable or canary version; roll out another first"
        )
    await _refuse_routed(session, row)
    served = await current_version(session, adapter)
    previous = row.state
    move_state(row, VersionState.DELETED)
    if served is not None and served.id == row.id:
        # An unpinned adapter's newest version: its successor as for a retired stable.
        adapter.stable_version = await _successor(session, row)
        await _stamp_new_stable(adapter, adapter.stable_version, session)
    else:
        if version == adapter.stable_version:
            adapter.stable_version = None  # no pointer at a deleted version (`name` unchanged)
        touch_if_tracked(adapter)
    await lock_artifact(session, row.artifact_sha256)  # no registration of these files now
    others = await artifact_references(session, row.artifact_sha256, excluding_id=row.id)
    remove_artifact = others == 0
    record(
        session,
        actor=actor,
        action="adapter_version.delete",
        target=f"adapter:{name}",
        details={
            "version": version,
            "from": previous.value,
            "artifact_sha256": row.artifact_sha256,
            "artifact_removed": remove_artifact,
            "reason": reason,
        },
    )
    await session.flush()
    if remove_artifact:
        # Still under the artifact's lock, so a registration of the same files waits and then
        # stores them again. A failed commit after this leaves a retired version without its
        # artifact (never servable again), no live version without one.
        await store.delete(row.artifact_sha256)
        logger.info("deleted artifact %s of %s@%s", row.artifact_sha256, name, version)
    await session.commit()
    return row


# How far a version has come: a successor is the furthest along (seed §7's ladder), so an
# evaluated or released version takes the name before one never evaluated.
_PROGRESS = {
    VersionState.PRODUCTION: 3,
    VersionState.CANARY_50: 2,
    VersionState.CANARY_10: 2,
    VersionState.CANARY_1: 2,
    VersionState.EVALUATED: 2,
    VersionState.COMPATIBLE: 1,
}


async def _successor(session: AsyncSession, leaving: AdapterVersion) -> int | None:
    """The version that serves `name` once `leaving`, its stable, stops: the version it
    replaced by a completed rollout, if still servable; else the furthest along the ladder
    (released, then evaluated, then merely compatible), the newest below `leaving` first, then
    the newest above. A version registered and never evaluated takes the name only when no
    other is left."""
    rows = await session.execute(
        select(AdapterVersion.version, AdapterVersion.state).where(
            AdapterVersion.adapter_id == leaving.adapter_id,
            AdapterVersion.id != leaving.id,
            AdapterVersion.state.in_(SERVABLE),
        )
    )
    candidates = [(version, VersionState(state)) for version, state in rows]
    if not candidates:
        return None
    replaced = await session.scalar(
        select(RolloutEvent.from_version)
        .where(
            RolloutEvent.adapter_id == leaving.adapter_id,
            RolloutEvent.action == "complete",
            RolloutEvent.to_version == leaving.version,
        )
        .order_by(RolloutEvent.id.desc())
        .limit(1)
    )

    def preference(candidate: tuple[int, VersionState]) -> tuple[bool, int, bool, int]:
        version, state = candidate
        return (version == replaced, _PROGRESS[state], version < leaving.version, version)

    return max(candidates, key=preference)[0]


async def _stamp_new_stable(adapter: Adapter, stable: int | None, session: AsyncSession) -> None:
    """Stamp a change of what `name` serves for polling replicas: always when the new stable
    arms a fallback (they must start judging it, as a first version's registration does),
    else only if they hold a view of the adapter."""
    row = None if stable is None else await version_row(session, adapter, stable)
    if row is not None and arms_fallback(adapter, row):
        touch(adapter)
    else:
        touch_if_tracked(adapter)


def move_state(row: AdapterVersion, target: VersionState) -> None:
    """Change a version's state if the state machine allows it (else InvalidStateTransition)."""
    check_transition(row.state, target, what=f"{row.adapter.name}@{row.version}")
    row.state = target
    row.state_changed_at = utcnow()


async def _refuse_routed(session: AsyncSession, row: AdapterVersion) -> None:
    adapter, address = row.adapter, f"{row.adapter.name}@{row.version}"
    if row.version == adapter.canary_version:
        raise InvalidStateTransition(f"{address} is in canary; promote or roll it back first")
    if row.version == adapter.shadow_version:
        raise InvalidStateTransition(f"{address} is in shadow; stop the shadow first")
    if adapter.canary_version is not None and row.version == adapter.stable_version:
        raise InvalidStateTransition(
            f"{address} is the stable of a running canary; finish the rollout first"
        )
    if adapter.shadow_version is not None and row.version == adapter.stable_version:
        raise InvalidStateTransition(
            f"{address} is the stable a running shadow is compared with; stop the shadow first"
        )
    routed_here = await session.scalar(
        select(Adapter.name).where(Adapter.active_target == address).limit(1)
    )
    if routed_here is not None:
        raise InvalidStateTransition(
            f"{address} serves {routed_here}'s traffic in fallback; restore that stable first"
        )


async def removed_versions(session: AsyncSession, version_ids: Collection[int]) -> set[int]:
    """Those of `version_ids` that are retired or deleted: a replica holding them loaded (its
    engine, its caches) drops them, whichever replica made the change."""
    if not version_ids:
        return set()
    query = select(AdapterVersion.id).where(
        AdapterVersion.id.in_(list(version_ids)),
        AdapterVersion.state.in_([VersionState.RETIRED, VersionState.DELETED]),
    )
    return set((await session.scalars(query)).all())


async def deleted_artifacts(session: AsyncSession, digests: Collection[str]) -> set[str]:
    """Those of `digests` that only deleted versions reference: their stored object is gone
    (or going), so a replica's local copy of it is garbage. A digest no version names at all
    is left alone (a registration may be storing it right now)."""
    wanted = sorted(digests)
    deleted: set[str] = set()
    live: set[str] = set()
    for start in range(0, len(wanted), DIGESTS_PER_QUERY):
        query = select(AdapterVersion.artifact_sha256, AdapterVersion.state).where(
            AdapterVersion.artifact_sha256.in_(wanted[start : start + DIGESTS_PER_QUERY])
        )
        for digest, state in await session.execute(query):
            (deleted if state == VersionState.DELETED else live).add(digest)
    return deleted - live
